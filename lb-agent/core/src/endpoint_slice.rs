//! An EndpointSlice as the agent decodes and keeps it: the fields the
//! Service compiler reads, under the names and types of the Kubernetes
//! object, and nothing else. An endpoint of the full type takes about
//! 340 bytes before its strings (its `targetRef` alone seven strings, four
//! of them filled by the EndpointSlice controller); this one about 130, and
//! the strings it leaves out are never allocated. At 10,000 Services of
//! 10 endpoints each that is most of what the Service side keeps.

use k8s_openapi::{
    api::discovery::v1::{EndpointConditions, EndpointHints, EndpointPort},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

/// What the agent keeps of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// Name, namespace, labels (its Service).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `addressType`: `IPv4`, `IPv6` or `FQDN` (required, as by the API).
    pub address_type: String,
    /// `endpoints`.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// `ports`.
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
}

/// What the agent keeps of an endpoint: not its `targetRef`, `hostname` or
/// `deprecatedTopology`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `addresses`.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// `conditions`: ready, serving, terminating.
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    /// `hints`: the zones and nodes it is meant for.
    #[serde(default)]
    pub hints: Option<EndpointHints>,
    /// `nodeName`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `zone`.
    #[serde(default)]
    pub zone: Option<String>,
}

slim_resource!(
    EndpointSlice,
    api_version: "discovery.k8s.io/v1",
    group: "discovery.k8s.io",
    kind: "EndpointSlice",
    plural: "endpointslices"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_as_the_controller_writes_it_decodes_into_what_the_agent_keeps() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": ["10.0.0.5"], "hostname": "web-0",
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node1", "zone": "a",
                "hints": {"forZones": [{"name": "a"}]},
                "deprecatedTopology": {"kubernetes.io/hostname": "node1"},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-0", "uid": "u1"},
            }],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap();
        assert_eq!(slice.address_type, "IPv4");
        let endpoint = &slice.endpoints[0];
        assert_eq!(endpoint.addresses, ["10.0.0.5"]);
        assert_eq!(endpoint.conditions.as_ref().unwrap().ready, Some(true));
        assert_eq!(endpoint.node_name.as_deref(), Some("node1"));
        assert_eq!(endpoint.zone.as_deref(), Some("a"));
        assert_eq!(
            endpoint.hints.as_ref().unwrap().for_zones.as_ref().unwrap()[0].name,
            "a"
        );
        assert_eq!(slice.ports.as_ref().unwrap()[0].port, Some(8080));
    }

    #[test]
    fn an_endpoint_kept_is_a_fraction_of_one_decoded_in_full() {
        let kept = std::mem::size_of::<Endpoint>();
        let full = std::mem::size_of::<k8s_openapi::api::discovery::v1::Endpoint>();
        assert!(kept * 2 < full, "{kept} of {full} bytes");
    }

    #[test]
    fn a_slice_without_an_address_type_is_refused_as_by_the_api() {
        let missing = serde_json::from_value::<EndpointSlice>(serde_json::json!({
            "metadata": {"name": "web-abc"}, "endpoints": [],
        }));
        assert!(missing.unwrap_err().to_string().contains("addressType"));
    }
}
