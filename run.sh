#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh demo   set everything up if needed, then run the demo
#   ./run.sh test   set everything up if needed, then run the whole test suite
# Setup is idempotent and does nothing when already done.
set -euo pipefail
cd "$(dirname "$0")"

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "run.sh: DeltaBox mounts FUSE filesystems and traces processes: run it as root" >&2
        exit 1
    fi
}

setup() {
    need_root
    if ! dpkg -s fuse3 libfuse3-dev pkg-config >/dev/null 2>&1; then
        echo "run.sh: installing Debian packages fuse3 libfuse3-dev pkg-config" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse3-dev pkg-config gcc >/dev/null
    fi
    local stamp=.venv/.installed
    local want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "run.sh: creating the virtualenv .venv" >&2
        python3 -m venv .venv
        if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test]'; } \
                >.venv/install.log 2>&1; then
            cat .venv/install.log >&2
            echo "run.sh: installing the Python packages failed (log above)" >&2
            exit 1
        fi
        echo "$want" > "$stamp"
    fi
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
