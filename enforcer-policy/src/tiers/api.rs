//! The wire shape of the cluster-wide policy kinds of `policy.networking.k8s.io`, as read from
//! a manifest or the API server: `ClusterNetworkPolicy` (v1alpha2) and its predecessors
//! `AdminNetworkPolicy` / `BaselineAdminNetworkPolicy` (v1alpha1). One lenient shape holds all
//! three: every field optional, unknown fields kept, so that [`super::parse`] can name what is
//! missing, misplaced or unknown instead of failing on the first surprise.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use serde_json::Value;

pub const GROUP: &str = "policy.networking.k8s.io";
pub const V1ALPHA2: &str = "policy.networking.k8s.io/v1alpha2";
pub const V1ALPHA1: &str = "policy.networking.k8s.io/v1alpha1";
pub const KIND_CNP: &str = "ClusterNetworkPolicy";
pub const KIND_ANP: &str = "AdminNetworkPolicy";
pub const KIND_BANP: &str = "BaselineAdminNetworkPolicy";

/// An object of one of the three kinds.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<Spec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// v1alpha2 only: `Admin` or `Baseline`.
    pub tier: Option<String>,
    /// ClusterNetworkPolicy and AdminNetworkPolicy: 0..=1000, lower first.
    pub priority: Option<i64>,
    pub subject: Option<Subject>,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// Exactly one field set.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    pub namespace_selector: Option<LabelSelector>,
    pub pod_selector: Option<LabelSelector>,
}

/// An ingress rule (`from`) or an egress rule (`to`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub name: Option<String>,
    pub action: Option<String>,
    pub from: Option<Vec<Peer>>,
    pub to: Option<Vec<Peer>>,
    /// v1alpha2.
    pub protocols: Option<Vec<Protocol>>,
    /// v1alpha1.
    pub ports: Option<Vec<AnpPort>>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// Exactly one field set; which ones exist depends on the direction and the version.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<NamespacedPod>,
    pub nodes: Option<LabelSelector>,
    pub networks: Option<Vec<String>>,
    pub domain_names: Option<Vec<String>>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// v1alpha2: exactly one field set.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Protocol {
    pub tcp: Option<ProtocolPorts>,
    pub udp: Option<ProtocolPorts>,
    pub sctp: Option<ProtocolPorts>,
    pub destination_named_port: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPorts {
    /// Unset: every port of the protocol.
    pub destination_port: Option<DestinationPort>,
}

/// v1alpha2: `number` or `range`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationPort {
    pub number: Option<i64>,
    pub range: Option<Range>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Range {
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// v1alpha1 only (defaults to TCP).
    pub protocol: Option<String>,
}

/// v1alpha1: exactly one field set.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnpPort {
    pub port_number: Option<AnpPortNumber>,
    pub named_port: Option<String>,
    pub port_range: Option<Range>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnpPortNumber {
    pub protocol: Option<String>,
    pub port: Option<i64>,
}
