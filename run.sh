#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh demo   set everything up if needed, then run the demo
#   ./run.sh test   set everything up if needed, then run the whole test suite
# Setup is idempotent and does nothing when already done.
set -euo pipefail
cd "$(dirname "$0")"
PYFUSE3=3.5.0  # the version third_party/ patches; pyproject.toml pins the same

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "run.sh: DeltaBox mounts FUSE filesystems and traces processes: run it as root" >&2
        exit 1
    fi
}

setup() {
    need_root
    if ! dpkg -s fuse3 libfuse3-dev pkg-config gcc patch >/dev/null 2>&1; then
        echo "run.sh: installing Debian packages fuse3 libfuse3-dev pkg-config gcc patch" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse3-dev pkg-config gcc \
            patch >/dev/null
    fi
    local stamp=.venv/.installed
    local want
    want="$(cat pyproject.toml third_party/pyfuse3-*.patch | sha256sum | cut -d' ' -f1)"
    if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "run.sh: creating the virtualenv .venv (about a minute: pyfuse3 is compiled)" >&2
        python3 -m venv .venv
        if ! { .venv/bin/pip install -q --upgrade pip && build_pyfuse3 \
                && .venv/bin/pip install -q -e '.[test]'; } >.venv/install.log 2>&1; then
            cat .venv/install.log >&2
            echo "run.sh: installing the Python packages failed (log above)" >&2
            exit 1
        fi
        echo "$want" > "$stamp"
    fi
}

build_pyfuse3() {
    # pyfuse3 from its source with our patch (third_party/README.md), installed
    # first so that the project's pin finds it and pip keeps it.
    local dir=.venv/build
    rm -rf "$dir" && mkdir -p "$dir"
    .venv/bin/pip download -q --no-deps --no-binary :all: "pyfuse3==$PYFUSE3" -d "$dir"
    tar -xzf "$dir/pyfuse3-$PYFUSE3.tar.gz" -C "$dir"
    patch -d "$dir/pyfuse3-$PYFUSE3" -p1 < "third_party/pyfuse3-$PYFUSE3-deltafs.patch"
    .venv/bin/pip install -q --no-deps --force-reinstall "$dir/pyfuse3-$PYFUSE3"
    rm -rf "$dir"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    demo)
        setup
        exec .venv/bin/deltabox demo "$@"
        ;;
    test)
        setup
        set +e
        .venv/bin/python -m pytest "$@"
        rc=$?
        set -e
        if [ "$rc" = 5 ]; then
            echo "run.sh: pytest collected no tests: that is a failure" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    *)
        echo "usage: ./run.sh demo|test [ARGS...]" >&2
        exit 2
        ;;
esac
