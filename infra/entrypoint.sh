#!/bin/sh
# Links the models the image provisioned at build time (/opt/llmops/models) into the state
# folder ($LLMOPS_STATE_DIR, a volume) when one is mounted, then runs the command. A link,
# not a copy: every container of this image has the files, and a fresh volume needs no
# network. A model the volume already holds (a real folder) is left as it is.
set -eu
state="${LLMOPS_STATE_DIR:-/var/lib/llmops}"
if [ -d "$state" ] && [ -d /opt/llmops/models ]; then
    mkdir -p "$state/models"
    for src in /opt/llmops/models/*/; do
        dst="$state/models/$(basename "$src")"
        [ -e "$dst" ] || [ -L "$dst" ] || ln -s "${src%/}" "$dst" 2>/dev/null || true
    done
fi
exec "$@"
