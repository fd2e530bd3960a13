#!/usr/bin/env bash
# A real Kubernetes control plane for the end-to-end tests, on 127.0.0.1 only:
# etcd, kube-apiserver and kube-controller-manager (with the real EndpointSlice
# controller), all from one multi-call binary built from Go modules in
# tests/e2e/k8s (k8s.io/kubernetes pinned there). No kubelet, no scheduler: the
# lab creates Node objects itself, binds Pods with spec.nodeName and writes
# their status.
#
#   scripts/k8s-controlplane.sh build        build once (cached), print the binary path
#   scripts/k8s-controlplane.sh start DIR    certs + kubeconfig in DIR, start, wait until ready
#   scripts/k8s-controlplane.sh stop DIR     stop what `start DIR` started
#   scripts/k8s-controlplane.sh status DIR   exit 0 if all three processes run
#
# After `start DIR`:
#   DIR/kubeconfig       admin (system:masters) kubeconfig, certificates embedded
#   DIR/bin/kubectl      kubectl of the same release (symlink to the binary)
#   DIR/env              shell-sourceable: K8S_API_SERVER, K8S_API_PORT, ETCD_PORT, ...
#   DIR/pids             "name pid" per line
#   DIR/logs/*.log       component logs
# `start` on a DIR used before keeps its certificates, etcd data and (if still
# free) its ports, so stop/start simulates an API server outage and recovery.
#
# Environment:
#   LB_E2E_CACHE         build cache root (default /var/cache/lb-e2e, else ~/.cache/lb-e2e)
#   K8S_BUILD_JOBS       go build -p (default: number of CPUs)
#   K8S_DUAL_STACK=0     IPv4 Service range only (default: 10.96.0.0/16 and fd00:96::/112)
#   K8S_KCM_CONTROLLERS  kube-controller-manager --controllers (default "*,-nodelifecycle":
#                        lab nodes send no heartbeats, and the node lifecycle controller
#                        would mark their Pods not ready and evict them)
#   K8S_ADVERTISE_ADDRESS  address for the `kubernetes` Service endpoints. Default:
#                        none (127.0.0.1 is not a valid endpoint, so the API server's
#                        endpoint reconciler is switched off)
#   K8S_START_TIMEOUT    seconds to wait for readiness (default 120)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODDIR="$ROOT/tests/e2e/k8s"
# Bump when the build command below changes in a way the inputs don't show.
BUILD_REV=1

log() { echo "k8s-controlplane: $*" >&2; }
die() { log "$*"; exit 1; }

cache_root() {
  if [ -n "${LB_E2E_CACHE:-}" ]; then
    echo "$LB_E2E_CACHE"
  elif mkdir -p /var/cache/lb-e2e 2>/dev/null && [ -w /var/cache/lb-e2e ]; then
    echo /var/cache/lb-e2e
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/lb-e2e"
  fi
}

k8s_version() { awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$MODDIR/go.mod"; }

build_key() {
  {
    echo "rev $BUILD_REV"
    go version
    cat "$MODDIR/go.mod" "$MODDIR/go.sum"
    find "$MODDIR/cmd" -type f -name '*.go' | LC_ALL=C sort | xargs cat
  } | sha256sum | cut -c1-16
}

cmd_build() {
  command -v go >/dev/null 2>&1 || die "go is required (Go >= 1.24)"
  local root key out bin ver major minor jobs ldflags t0
  root="$(cache_root)/k8s"
  key="$(build_key)"
  out="$root/$key"
  bin="$out/k8s-lab"
  if [ -x "$bin" ]; then
    echo "$bin"
    return 0
  fi
  mkdir -p "$out"
  # One build at a time per key; a second caller waits and reuses the result.
  exec 9>"$out/.lock"
  flock 9
  if [ -x "$bin" ]; then
    echo "$bin"
    return 0
  fi
  ver="$(k8s_version)"
  [ -n "$ver" ] || die "no k8s.io/kubernetes version in $MODDIR/go.mod"
  major="${ver#v}"; major="${major%%.*}"
  minor="${ver#v*.}"; minor="${minor%%.*}"
  jobs="${K8S_BUILD_JOBS:-$(nproc)}"
  # Stamp the release into both version packages, as Kubernetes' own build does;
  # otherwise every component reports v0.0.0-master.
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$ver -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit=$ver"
  done
  log "building kube-apiserver, kube-controller-manager, etcd, kubectl $ver (go build -p $jobs); a cold build takes several minutes"
  t0=$SECONDS
  (
    cd "$MODDIR"
    nice -n 10 go build -mod=readonly -trimpath -p "$jobs" -ldflags "$ldflags" \
      -o "$bin.tmp" ./cmd/k8s-lab
  ) >&2
  mv -f "$bin.tmp" "$bin"
  for name in kube-apiserver kube-controller-manager etcd kubectl; do
    ln -sfn k8s-lab "$out/$name"
  done
  log "built $bin in $((SECONDS - t0))s ($(du -h "$bin" | cut -f1))"
  # Older builds are of no further use.
  find "$root" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} + 2>/dev/null || true
  echo "$bin"
}

# A port on 127.0.0.1 that nothing uses, outside the ephemeral range so that no
# outgoing connection takes it between now and the bind.
port_in_use() {
  # TIME-WAIT leftovers of an earlier run do not block a bind (Go sets SO_REUSEADDR).
  ss -Htan exclude time-wait 2>/dev/null | awk '{ print $4 }' | grep -qE "[:.]$1\$"
}
# pick_port VAR: set VAR to a free port, the one recorded in DIR/env by an
# earlier start if that is still free (not in a subshell: TAKEN_PORTS must stick).
pick_port() {
  local var="$1" p="" i
  [ -f "$DIR/env" ] && p="$(sed -n "s/^$var=//p" "$DIR/env")"
  for i in $(seq 1 200); do
    if [ -n "$p" ] && ! port_in_use "$p" && ! grep -qw "$p" <<<"$TAKEN_PORTS"; then
      TAKEN_PORTS+=" $p"
      printf -v "$var" '%s' "$p"
      return 0
    fi
    p=$((20000 + RANDOM % 10000))
  done
  die "no free port found"
}
TAKEN_PORTS=""

ensure_openssl() {
  command -v openssl >/dev/null 2>&1 && return 0
  log "installing openssl"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends openssl >/dev/null
}

# new_ca NAME CN: a self-signed CA in $PKI.
new_ca() {
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/$1.key" -out "$PKI/$1.crt" \
    -days 3650 -sha256 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
}

# issue NAME SUBJECT EXT [CA]: key + certificate signed by CA (default ca) in $PKI.
issue() {
  local name="$1" subj="$2" ext="$3" ca="${4:-ca}"
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  printf '%s\n' "$ext" >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr"
}

gen_pki() {
  [ -f "$PKI/done" ] && return 0
  ensure_openssl
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  new_ca ca lb-e2e-ca
  # The aggregation layer's request-header CA, as kubeadm sets it up; controller
  # managers and aggregated API servers read it from the API server.
  new_ca front-proxy-ca lb-e2e-front-proxy-ca
  local client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  issue apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:::1,IP:10.96.0.1,IP:fd00:96::1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  issue admin "/O=system:masters/CN=lb-e2e-admin" "$client"
  issue controller-manager "/CN=system:kube-controller-manager" "$client"
  issue front-proxy-client "/CN=front-proxy-client" "$client" front-proxy-ca
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  touch "$PKI/done"
}

# write_kubeconfig FILE USER: kubeconfig for the API server with USER's client cert.
write_kubeconfig() {
  local file="$1" user="$2"
  cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: lb-e2e
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/$user.crt")
    client-key-data: $(base64 -w0 <"$PKI/$user.key")
contexts:
- name: lb-e2e
  context:
    cluster: lb-e2e
    user: $user
current-context: lb-e2e
EOF
  chmod 600 "$file.tmp"
  mv -f "$file.tmp" "$file"
}

pid_alive() {
  # Alive and still ours: a reused pid would run another program.
  local pid="$1" bin="$2" exe
  [ -n "$pid" ] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  # A newer build may have removed the binary it runs.
  [ "${exe% (deleted)}" = "$bin" ]
}

# launch NAME ARGS...: start a component in its own session, detached from us.
launch() {
  local name="$1"
  shift
  setsid "$BIN" "$@" </dev/null >>"$DIR/logs/$name.log" 2>&1 &
  local pid=$! i
  echo "$name $pid" >>"$DIR/pids"
  # Until the child has exec'd, /proc/PID/exe is bash's.
  for i in $(seq 1 50); do
    pid_alive "$pid" "$BIN" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  die "$name did not start; see $DIR/logs/$name.log"
}

# wait_for WHAT CMD...: run CMD until it succeeds, fail after the start timeout.
wait_for() {
  local what="$1"
  shift
  local deadline=$((SECONDS + ${K8S_START_TIMEOUT:-120}))
  until "$@" >/dev/null 2>&1; do
    check_running || die "a component exited while waiting for $what; see $DIR/logs/"
    [ $SECONDS -lt $deadline ] || die "timed out waiting for $what; see $DIR/logs/"
    sleep 0.5
  done
}

check_running() {
  local name pid
  [ -f "$DIR/pids" ] || return 1
  while read -r name pid; do
    pid_alive "$pid" "$BIN" || { log "$name (pid $pid) is not running"; return 1; }
  done <"$DIR/pids"
}

cmd_start() {
  DIR="$1"
  mkdir -p "$DIR"
  DIR="$(cd "$DIR" && pwd)"
  PKI="$DIR/pki"
  BIN="$(readlink -f "$(cmd_build)")"
  [ -x "$BIN" ] || die "build failed"
  if [ -f "$DIR/pids" ]; then
    if check_running 2>/dev/null; then
      die "already running in $DIR (stop it first)"
    fi
    stop_dir
  fi
  mkdir -p "$DIR/logs" "$DIR/bin"
  ln -sfn "$BIN" "$DIR/bin/k8s-lab"
  ln -sfn "$(dirname "$BIN")/kubectl" "$DIR/bin/kubectl"
  gen_pki

  pick_port ETCD_PORT
  pick_port ETCD_PEER_PORT
  pick_port K8S_API_PORT
  pick_port KCM_PORT
  API_PORT=$K8S_API_PORT
  local svc_range="10.96.0.0/16"
  [ "${K8S_DUAL_STACK:-1}" = 0 ] || svc_range="10.96.0.0/16,fd00:96::/112"

  write_kubeconfig "$DIR/kubeconfig" admin
  write_kubeconfig "$DIR/controller-manager.kubeconfig" controller-manager
  cat >"$DIR/env" <<EOF
K8S_API_SERVER=https://127.0.0.1:$API_PORT
K8S_API_PORT=$API_PORT
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
KCM_PORT=$KCM_PORT
KUBECONFIG=$DIR/kubeconfig
KUBECTL=$DIR/bin/kubectl
K8S_SERVICE_CIDRS=$svc_range
EOF
  : >"$DIR/pids"
  # Whatever fails from here on, leave nothing running behind.
  trap 'rc=$?; [ $rc = 0 ] || stop_dir; exit $rc' EXIT

  launch etcd etcd \
    --name lb-e2e \
    --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync \
    --log-level warn
  wait_for "etcd" bash -c "exec 3<>/dev/tcp/127.0.0.1/$ETCD_PORT"

  local advertise=(--advertise-address=127.0.0.1 --endpoint-reconciler-type=none)
  if [ -n "${K8S_ADVERTISE_ADDRESS:-}" ]; then
    advertise=(--advertise-address="$K8S_ADVERTISE_ADDRESS")
  fi
  launch kube-apiserver apiserver \
    --bind-address=127.0.0.1 \
    --secure-port="$API_PORT" \
    "${advertise[@]}" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --service-cluster-ip-range="$svc_range" \
    --authorization-mode=Node,RBAC \
    --allow-privileged=true \
    --client-ca-file="$PKI/ca.crt" \
    --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
    --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --cert-dir="$DIR/apiserver-certs"
  wait_for "kube-apiserver /readyz" "$BIN" kubectl --kubeconfig "$DIR/kubeconfig" get --raw /readyz

  launch kube-controller-manager controller-manager \
    --kubeconfig="$DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="$KCM_PORT" \
    --cert-dir="$DIR/controller-manager-certs" \
    --controllers="${K8S_KCM_CONTROLLERS:-*,-nodelifecycle}" \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" \
    --cluster-signing-key-file="$PKI/ca.key" \
    --leader-elect=false
  wait_for "kube-controller-manager /healthz" "$BIN" kubectl --kubeconfig "$DIR/kubeconfig" \
    --server "https://127.0.0.1:$KCM_PORT" --insecure-skip-tls-verify=true get --raw /healthz
  # Pods can be created once the ServiceAccount controller made the default account.
  wait_for "the default ServiceAccount" "$BIN" kubectl --kubeconfig "$DIR/kubeconfig" \
    get serviceaccount default --namespace default

  trap - EXIT
  log "ready: kube-apiserver https://127.0.0.1:$API_PORT, etcd 127.0.0.1:$ETCD_PORT, kube-controller-manager 127.0.0.1:$KCM_PORT"
  echo "$DIR/kubeconfig"
}

# stop_dir: TERM each process of DIR/pids (newest first), KILL what is left after 10 s.
stop_dir() {
  local name pid names=() pids=() i
  [ -f "$DIR/pids" ] || return 0
  while read -r name pid; do
    names+=("$name")
    pids+=("$pid")
  done <"$DIR/pids"
  local bin="${BIN:-k8s-lab}"
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid_alive "${pids[$i]}" "$bin" && kill -TERM "${pids[$i]}" 2>/dev/null || true
  done
  local deadline=$((SECONDS + 10)) left
  while :; do
    left=0
    for pid in "${pids[@]}"; do
      pid_alive "$pid" "$bin" && left=1
    done
    [ $left = 0 ] && break
    if [ $SECONDS -ge $deadline ]; then
      for pid in "${pids[@]}"; do
        pid_alive "$pid" "$bin" && kill -KILL "$pid" 2>/dev/null || true
      done
      break
    fi
    sleep 0.2
  done
  rm -f "$DIR/pids"
}

cmd_stop() {
  DIR="$(cd "$1" 2>/dev/null && pwd)" || { log "no such directory: $1"; return 0; }
  BIN="$(readlink -f "$DIR/bin/k8s-lab" 2>/dev/null || echo k8s-lab)"
  stop_dir
  log "stopped $DIR"
}

cmd_status() {
  DIR="$(cd "$1" && pwd)"
  BIN="$(readlink -f "$DIR/bin/k8s-lab" 2>/dev/null || echo k8s-lab)"
  check_running
}

case "${1:-}" in
  build) cmd_build ;;
  start) [ $# -eq 2 ] || die "usage: $0 start DIR"; cmd_start "$2" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; cmd_stop "$2" ;;
  status) [ $# -eq 2 ] || die "usage: $0 status DIR"; cmd_status "$2" ;;
  *) die "usage: $0 build | start DIR | stop DIR | status DIR" ;;
esac
