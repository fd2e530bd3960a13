//! A synthetic cluster's policy objects, as YAML: namespaces, pods spread
//! over nodes with label sets like a real cluster's, and NetworkPolicies
//! mixing pod and namespace selectors, ipBlocks, named ports and port
//! ranges. Every pod has a label of its own (`instance`), so the pods make
//! as many identities as there are pods: the worst case for the compiler.

use std::fmt::Write as _;

/// Namespaces the pods and policies are spread over.
pub const NAMESPACES: usize = 100;
/// Distinct `app` labels.
const APPS: usize = 500;
/// Distinct `tier` labels.
const TIERS: usize = 4;

/// The shape of the synthetic cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Synthetic {
    /// Pods (and so identities).
    pub pods: usize,
    /// NetworkPolicies.
    pub policies: usize,
    /// Nodes the pods are spread over (`filler-0`, `filler-1`, ...).
    pub nodes: usize,
}

impl Synthetic {
    /// Pod `i`'s address (10.252.0.0/16 and up, never a lab address).
    pub fn pod_ip(i: usize) -> String {
        format!("10.{}.{}.{}", 252 + i / 62_500, i / 250 % 250, i % 250 + 1)
    }

    /// Pod `i`'s node.
    pub fn node_of(&self, i: usize) -> String {
        format!("filler-{}", i % self.nodes.max(1))
    }

    /// Pod `i` with `app` label `app`.
    pub fn pod(&self, i: usize, app: usize) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: f-{i}\n  namespace: fill-{ns}\n  uid: f-{i}\n  labels: {{app: a-{app}, tier: t-{tier}, instance: i-{i}, pod-template-hash: h{hash}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: x\n    ports:\n    - {{name: http, containerPort: 8080}}\n    - {{name: metrics, containerPort: 9090}}\nstatus:\n  phase: Running\n  podIP: {ip}\n",
            ns = i % NAMESPACES,
            tier = i % TIERS,
            hash = i % 7,
            node = self.node_of(i),
            ip = Self::pod_ip(i),
        )
    }

    /// Policy `j`.
    pub fn policy(j: usize) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p-{j}\n  namespace: fill-{ns}\nspec:\n  podSelector:\n    matchLabels: {{app: a-{app}}}\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {{tier: t-{tier}}}\n      namespaceSelector:\n        matchLabels: {{kubernetes.io/metadata.name: fill-{peer_ns}}}\n    - podSelector:\n        matchExpressions:\n        - {{key: app, operator: In, values: [a-{peer_app}, a-{peer_app2}]}}\n    ports:\n    - port: http\n    - {{port: 9000, endPort: 9100, protocol: TCP}}\n  - from:\n    - ipBlock:\n        cidr: 172.{net}.0.0/16\n        except: [172.{net}.{sub}.0/24]\n    ports:\n    - {{port: 443, protocol: TCP}}\n  egress:\n  - to:\n    - podSelector:\n        matchLabels: {{app: a-{egress_app}}}\n    ports:\n    - port: metrics\n  - ports:\n    - {{port: 53, protocol: UDP}}\n",
            ns = j % NAMESPACES,
            app = j % APPS,
            tier = j % TIERS,
            peer_ns = (j + 1) % NAMESPACES,
            peer_app = (j * 7 + 3) % APPS,
            peer_app2 = (j * 13 + 5) % APPS,
            net = 16 + j % 16,
            sub = j % 250,
            egress_app = (j + 11) % APPS,
        )
    }

    /// Every namespace, pod and policy, as one YAML stream.
    pub fn yaml(&self) -> String {
        let mut text = String::with_capacity(self.pods * 520 + self.policies * 900);
        for n in 0..NAMESPACES {
            let _ = write!(
                text,
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: fill-{n}\n  labels: {{team: t{}}}\n---\n",
                n % 10
            );
        }
        for i in 0..self.pods {
            text.push_str(&self.pod(i, i % APPS));
            text.push_str("---\n");
        }
        for j in 0..self.policies {
            text.push_str(&Self::policy(j));
            text.push_str("---\n");
        }
        text
    }
}
