//! The 48 upstream Kubernetes NetworkPolicy e2e cases (kubernetes v1.34.4,
//! `test/e2e/network/netpol/network_policy.go`: 42 TCP, 3 UDP, 3 SCTP), one
//! test each, named after the upstream `It` (UDP and SCTP contexts prefixed
//! `udp_` / `sctp_`), against the agent with a real kube-apiserver.
//!
//! The cases come from `tests/e2e/netpol/cases.json`; the cluster, the probes
//! and the runner are in `lb_e2e::netpol`; the mapping and what each case
//! exercises are in `docs/netpol-cases.md`.
//!
//! One cluster serves the whole file: two lab nodes, each with a lab kubelet
//! and the agent, namespaces x, y, z with pods a, b, c each spread over both
//! nodes, and a ClusterIP Service `s-<ns>-<pod>` per pod. Each probe step
//! checks the whole 9x9 matrix, from every pod to every other pod's pod IP
//! and ClusterIP, until it equals upstream's expectation or 15 s pass. Cases
//! run one at a time and undo their policies and labels when they end.
//!
//! Needs root; `make test` runs as root. Run just this file with
//! `cargo test -p lb-e2e --test netpol` (add `-- --nocapture` for timings).

use anyhow::Result;
use lb_e2e::netpol;

/// `ID => test_name`: one `#[test]` per case, running the case with that id
/// and test name in `cases.json`.
macro_rules! cases {
    ($($id:literal => $name:ident,)*) => {
        $(
            #[test]
            fn $name() -> Result<()> {
                netpol::run_case($id, stringify!($name))
            }
        )*

        /// The functions above are exactly the cases of the data file (no root needed).
        #[test]
        fn every_case_has_one_test() -> Result<()> {
            netpol::check_test_names(&[$(stringify!($name)),*])
        }
    };
}

/// Not an upstream case: the probes see drops and refusals made without
/// the agent (nftables in two pods), so a failing case is the datapath's.
#[test]
fn harness_sees_drops_and_refusals() -> Result<()> {
    netpol::check_harness()
}

cases! {
    1 => should_support_a_default_deny_ingress_policy,
    2 => should_support_a_default_deny_all_policy,
    3 => should_enforce_policy_to_allow_traffic_from_pods_within_server_namespace_based_on_pod_selector,
    4 => should_enforce_policy_to_allow_ingress_traffic_for_a_target,
    5 => should_enforce_policy_to_allow_ingress_traffic_from_pods_in_all_namespaces,
    6 => should_enforce_policy_to_allow_traffic_only_from_a_different_namespace_based_on_namespace_selector,
    7 => should_enforce_policy_based_on_pod_selector_with_match_expressions,
    8 => should_enforce_policy_based_on_namespace_selector_with_match_expressions,
    9 => should_enforce_policy_based_on_pod_selector_or_namespace_selector,
    10 => should_enforce_policy_based_on_pod_selector_and_namespace_selector,
    11 => should_enforce_policy_based_on_multiple_pod_selectors_and_namespace_selectors,
    12 => should_enforce_policy_based_on_any_pod_selectors,
    13 => should_enforce_policy_to_allow_traffic_only_from_a_pod_in_a_different_namespace_based_on_pod_selector_and_namespace_selector,
    14 => should_enforce_policy_based_on_ports,
    15 => should_enforce_multiple_stacked_policies_with_overlapping_pod_selectors,
    16 => should_support_allow_all_policy,
    17 => should_allow_ingress_access_on_one_named_port,
    18 => should_allow_ingress_access_from_namespace_on_one_named_port,
    19 => should_allow_egress_access_on_one_named_port,
    20 => should_enforce_updated_policy,
    21 => should_allow_ingress_access_from_updated_namespace,
    22 => should_allow_ingress_access_from_updated_pod,
    23 => should_deny_ingress_from_pods_on_other_namespaces,
    24 => should_deny_ingress_access_to_updated_pod,
    25 => should_deny_egress_from_pods_based_on_pod_selector,
    26 => should_deny_egress_from_all_pods_in_a_namespace,
    27 => should_work_with_ingress_egress_specified_together,
    28 => should_support_denying_of_egress_traffic_on_the_client_side_even_if_the_server_explicitly_allows_this_traffic,
    29 => should_enforce_egress_policy_allowing_traffic_to_a_server_in_a_different_namespace_based_on_pod_selector_and_namespace_selector,
    30 => should_enforce_ingress_policy_allowing_any_port_traffic_to_a_server_on_a_specific_protocol,
    31 => should_enforce_multiple_ingress_policies_with_ingress_allow_all_policy_taking_precedence,
    32 => should_enforce_multiple_egress_policies_with_egress_allow_all_policy_taking_precedence,
    33 => should_stop_enforcing_policies_after_they_are_deleted,
    34 => should_allow_egress_access_to_server_in_cidr_block,
    35 => should_enforce_except_clause_while_egress_access_to_server_in_cidr_block,
    36 => should_ensure_an_ip_overlapping_both_ip_block_cidr_and_ip_block_except_is_allowed,
    37 => should_enforce_policies_to_check_ingress_and_egress_policies_can_be_controlled_independently_based_on_pod_selector,
    38 => should_not_mistakenly_treat_protocol_sctp_as_protocol_tcp_even_if_the_plugin_doesnt_support_sctp,
    39 => should_properly_isolate_pods_that_are_selected_by_a_policy_allowing_sctp_even_if_the_plugin_doesnt_support_sctp,
    40 => should_not_allow_access_by_tcp_when_a_policy_specifies_only_udp,
    41 => should_enforce_policy_to_allow_traffic_based_on_namespace_selector_with_match_labels_using_default_ns_label,
    42 => should_enforce_policy_based_on_namespace_selector_with_match_expressions_using_default_ns_label,
    43 => udp_should_support_a_default_deny_ingress_policy,
    44 => udp_should_enforce_policy_based_on_ports,
    45 => udp_should_enforce_policy_to_allow_traffic_only_from_a_pod_in_a_different_namespace_based_on_pod_selector_and_namespace_selector,
    46 => sctp_should_support_a_default_deny_ingress_policy,
    47 => sctp_should_enforce_policy_based_on_ports,
    48 => sctp_should_enforce_policy_to_allow_traffic_only_from_a_pod_in_a_different_namespace_based_on_pod_selector_and_namespace_selector,
}
