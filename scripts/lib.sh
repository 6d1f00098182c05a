# Shared set-up steps for scripts/demo and scripts/test (sourced, not run).
# Installs missing Debian packages (as root, or through sudo) and the Python venv.
export DEBIAN_FRONTEND=noninteractive PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '==> %s\n' "$*" >&2; }

# apt_install PKG... : install the named Debian packages.
apt_install() {
    (($#)) || return 0
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { say "missing Debian packages: $* (run as root or install sudo)"; exit 1; }
        sudo=(sudo -n)
    fi
    say "installing Debian packages: $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" </dev/null
}

# python_packages : the Debian packages still needed for a Python >= 3.11 venv.
python_packages() {
    if ! command -v python3 >/dev/null; then
        echo python3 python3-venv
    elif [[ ! -x .venv/bin/python ]] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo python3-venv
    fi
}

# ensure_venv SPEC : create .venv (Python >= 3.11) and pip-install SPEC into it.
ensure_venv() {
    if [[ ! -x .venv/bin/python ]]; then
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
            say "python3 is $(python3 --version 2>&1); drdaemon needs Python >= 3.11"
            exit 1
        }
        say "creating .venv"
        python3 -m venv .venv
    fi
    say "installing $1 into .venv"
    .venv/bin/python -m pip install -q -e "$1" </dev/null
}
