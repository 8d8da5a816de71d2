#!/usr/bin/env bash
# Builds a kube-apiserver for the mesh-sync end-to-end test, once per machine, into a cache.
#
#   bash charts/tools/build-kube-apiserver.sh          # prints the binary's path
#
# No prebuilt Kubernetes server binary comes from a package registry, so this builds Debian's
# `kubernetes` source package (1.20.2) with Debian's Go: ~8-9 minutes on 2 cores, ~1.5 GiB of disk.
# Its vendored modern-go/reflect2 crashes on Go >= 1.18 the first time a custom resource is
# created; it is replaced by Debian's reflect2 1.0.2. Everything lands in
# ${SLUICE_TOOLS_CACHE:-~/.cache/sluice-tools}/kube-apiserver-1.20.2/; a second run only prints the path.
# Needs root for apt-get (source download through a private sources list; the system's
# sources are left untouched).
set -euo pipefail
cache=${SLUICE_TOOLS_CACHE:-$HOME/.cache/sluice-tools}
dest=$cache/kube-apiserver-1.20.2
bin=$dest/kube-apiserver
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$dest"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log() { echo "build-kube-apiserver: $*" >&2; }

log "installing Debian's Go and reflect2 1.0.2"
export DEBIAN_FRONTEND=noninteractive
packages=(golang-go golang-github-modern-go-reflect2-dev dpkg-dev make rsync)
apt-get install -y -qq "${packages[@]}" >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null && apt-get install -y -qq "${packages[@]}" >/dev/null; }

# deb-src lines for the same suite as the system's sources, in a private apt state directory.
log "downloading the kubernetes source package"
apt_dir=$work/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/none"
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
mirror=$({ grep -hoE '^(URIs:|deb) *[a-z]+://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
           /etc/apt/sources.list 2>/dev/null || true; } | head -1 | awk '{print $2}')
[ -n "$mirror" ] || { log "no Debian mirror found in /etc/apt/sources*"; exit 1; }
echo "deb-src ${mirror%/} $codename main" > "$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/none"
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
          -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" update -qq >/dev/null
(cd "$work" && apt-get "${apt_opts[@]}" source -qq --download-only kubernetes >/dev/null)
(cd "$work" && dpkg-source -x --no-check ./kubernetes_*.dsc src >/dev/null)

log "replacing vendored reflect2 with Debian's 1.0.2"
vendored=$work/src/vendor/github.com/modern-go/reflect2
rm -rf "$vendored" && mkdir -p "$vendored"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2/. "$vendored/"

# The OpenAPI definitions are generated at build time, not shipped in the source.
log "generating the OpenAPI definitions"
(cd "$work/src" && CGO_ENABLED=0 make gen_openapi >/dev/null)

# Kubernetes 1.20 builds in GOPATH mode (hack/lib/init.sh sets GO111MODULE=off), as Debian's rules do.
log "building cmd/kube-apiserver (takes ~8-9 minutes)"
mkdir -p "$work/gopath/src/k8s.io"
ln -s "$work/src" "$work/gopath/src/k8s.io/kubernetes"
version=k8s.io/kubernetes/vendor/k8s.io/component-base/version
(cd "$work/gopath/src/k8s.io/kubernetes" && GO111MODULE=off GOPATH=$work/gopath CGO_ENABLED=0 GOCACHE=$work/gocache \
    go build -ldflags="-s -w -X $version.gitVersion=v1.20.2 -X $version.gitMajor=1 -X $version.gitMinor=20" \
    -o "$work/kube-apiserver" ./cmd/kube-apiserver)
mv "$work/kube-apiserver" "$bin"
log "built $bin"
echo "$bin"
