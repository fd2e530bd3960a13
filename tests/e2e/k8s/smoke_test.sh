#!/usr/bin/env bash
# Smoke test of the real control plane (scripts/k8s-controlplane.sh): the API
# server allocates a Service's ClusterIP and NodePort, and the real EndpointSlice
# controller publishes a Pod that a stand-in "kubelet" (kubectl patch of the
# status subresource) reports Running and Ready on node1, then withdraws it when
# the Pod is deleted.
#
#   tests/e2e/k8s/smoke_test.sh          start a control plane in a temp dir, test, stop
#   K8S_DIR=DIR tests/e2e/k8s/smoke_test.sh   use the control plane already running in DIR
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
CP="$ROOT/scripts/k8s-controlplane.sh"
passed=0
failed=0

if [ -n "${K8S_DIR:-}" ]; then
  DIR="$K8S_DIR"
else
  DIR="$(mktemp -d /tmp/lb-e2e-k8s.XXXXXX)"
  trap '"$CP" stop "$DIR"; rm -rf "$DIR"' EXIT
  t0=$SECONDS
  "$CP" start "$DIR" >/dev/null
  echo "control plane ready in $((SECONDS - t0))s"
fi
kubectl() { "$DIR/bin/kubectl" --kubeconfig "$DIR/kubeconfig" "$@"; }
ns="smoke-$$"

ok() { echo "ok   $*"; passed=$((passed + 1)); }
bad() { echo "FAIL $*"; failed=$((failed + 1)); }

# eventually SECONDS CMD...: retry CMD until it succeeds or the time is up.
eventually() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

kubectl version | sed 's/^/  /'

kubectl apply -f - <<EOF
apiVersion: v1
kind: Node
metadata:
  name: node1
  labels:
    kubernetes.io/hostname: node1
---
apiVersion: v1
kind: Namespace
metadata:
  name: $ns
EOF
# Pods need the namespace's default ServiceAccount (ServiceAccount admission).
eventually 30 kubectl -n "$ns" get serviceaccount default >/dev/null 2>&1 &&
  ok "serviceaccount controller created $ns/default" || bad "no default ServiceAccount in $ns"

kubectl -n "$ns" apply -f - <<'EOF'
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  labels:
    app: web
spec:
  nodeName: node1
  containers:
  - name: web
    image: lab/web
    ports:
    - containerPort: 8080
EOF

cluster_ips="$(kubectl -n "$ns" get service web -o jsonpath='{.spec.clusterIPs}')"
node_port="$(kubectl -n "$ns" get service web -o jsonpath='{.spec.ports[0].nodePort}')"
echo "  service $ns/web: clusterIPs=$cluster_ips nodePort=$node_port"
[[ "$cluster_ips" =~ \"10\.96\.[0-9]+\.[0-9]+\" ]] && ok "ClusterIP allocated from 10.96.0.0/16" ||
  bad "no IPv4 ClusterIP from 10.96.0.0/16: $cluster_ips"
if [ "${K8S_DUAL_STACK:-1}" != 0 ]; then
  [[ "$cluster_ips" == *'"fd00:96::'* ]] && ok "IPv6 ClusterIP allocated from fd00:96::/112" ||
    bad "no IPv6 ClusterIP: $cluster_ips"
fi
[ -n "$node_port" ] && [ "$node_port" -ge 30000 ] && [ "$node_port" -le 32767 ] &&
  ok "NodePort allocated" || bad "no NodePort: $node_port"

# The lab kubelet's job: report the Pod running and ready with its address.
kubectl -n "$ns" patch pod web-1 --subresource=status --type=merge -p '{
  "status": {
    "phase": "Running",
    "hostIP": "192.168.100.1",
    "hostIPs": [{"ip": "192.168.100.1"}],
    "podIP": "10.244.1.2",
    "podIPs": [{"ip": "10.244.1.2"}],
    "conditions": [
      {"type": "PodScheduled", "status": "True"},
      {"type": "Initialized", "status": "True"},
      {"type": "ContainersReady", "status": "True"},
      {"type": "Ready", "status": "True"}
    ]
  }
}' >/dev/null

slice_endpoints() {
  kubectl -n "$ns" get endpointslices -l kubernetes.io/service-name=web -o jsonpath='{range .items[*]}{range .endpoints[*]}{.addresses[0]} ready={.conditions.ready} node={.nodeName} pod={.targetRef.name}{"\n"}{end}{end}'
}
has_ready_endpoint() { slice_endpoints | grep -q '^10.244.1.2 ready=true node=node1 pod=web-1$'; }
t0=$(date +%s%N)
if eventually 30 has_ready_endpoint; then
  ok "EndpointSlice controller published 10.244.1.2 (ready, node1) in $((($(date +%s%N) - t0) / 1000000)) ms"
else
  bad "no ready endpoint 10.244.1.2 in the EndpointSlices"
fi
kubectl -n "$ns" get endpointslices -l kubernetes.io/service-name=web -o wide | sed 's/^/  /'

t0=$(date +%s%N)
kubectl -n "$ns" delete pod web-1 --wait=false >/dev/null
no_endpoint() { ! slice_endpoints | grep -q '^10.244.1.2 '; }
# Without a kubelet the Pod stays Terminating; the controller drops it from
# the ready endpoints (publishNotReadyAddresses is false) right away.
not_ready() { ! slice_endpoints | grep -q '^10.244.1.2 ready=true'; }
if eventually 30 not_ready; then
  ok "endpoint withdrawn from ready after Pod deletion in $((($(date +%s%N) - t0) / 1000000)) ms"
else
  bad "endpoint still ready after Pod deletion"
fi
# The lab kubelet finishes the deletion (grace period 0) once the program is gone.
kubectl -n "$ns" delete pod web-1 --grace-period=0 --force >/dev/null 2>&1 || true
eventually 30 no_endpoint && ok "endpoint removed after the Pod is gone" || bad "endpoint still present"

kubectl delete namespace "$ns" --wait=false >/dev/null
echo "smoke: $passed passed, $failed failed"
[ "$failed" = 0 ]
