#!/bin/sh
# Refuse to start the compose stack while a secret still holds its placeholder.
#
#   sh infra/preflight.sh NAME...
#
# Checks each named environment variable: unset, empty, or still holding a change-me value from
# infra/.env.example is an error. Prints one line per such variable (to stderr, naming it, never
# its value) and exits 1; prints one line and exits 0 when every value is real. The compose
# file's `preflight` service runs this first (every other service waits for it to succeed);
# by hand, against your infra/.env:
#
#   (set -a; . infra/.env; sh infra/preflight.sh POSTGRES_PASSWORD MINIO_ROOT_PASSWORD ...)
#
# POSIX sh (the container runs busybox sh); bash runs it as well.
set -eu

if [ "$#" -eq 0 ]; then
    echo "preflight: no variables named to check" >&2
    exit 2
fi

bad=0
for name in "$@"; do
    case "$name" in
        "" | [!A-Za-z_]* | *[!A-Za-z0-9_]*)
            echo "preflight: '$name' is not a variable name" >&2
            exit 2 ;;
    esac
    value="$(printenv "$name" || true)"
    case "$value" in
        "")
            echo "preflight: $name is not set: give it a value in infra/.env" >&2
            bad=1 ;;
        *[Cc][Hh][Aa][Nn][Gg][Ee]-[Mm][Ee]* | *[Cc][Hh][Aa][Nn][Gg][Ee][Mm][Ee]*)
            echo "preflight: $name is still the placeholder from infra/.env.example: replace it in infra/.env" >&2
            bad=1 ;;
    esac
done

if [ "$bad" -ne 0 ]; then
    exit 1
fi
echo "preflight: ok, no placeholder among $*"
