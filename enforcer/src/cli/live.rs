//! A one-shot read of a live cluster for the offline tools (`lint --kubeconfig`): Namespaces,
//! Pods, NetworkPolicies and Services, plus ServiceAccounts and the nodes' addresses when the
//! credentials may list them.

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, Result};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};

use super::lint::Input;

async fn list<K>(client: &Client) -> Result<Vec<K>>
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    Ok(Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items)
}

async fn list_namespaced<K>(client: &Client) -> Result<Vec<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    Ok(Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items)
}

/// Lists the objects once through `kubeconfig` (its `context`, else the current one).
pub fn load(kubeconfig: &Path, context: Option<&str>) -> Result<Input> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let kc = Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
        let options = KubeConfigOptions {
            context: context.map(str::to_string),
            ..KubeConfigOptions::default()
        };
        let config = kube::Config::from_custom_kubeconfig(kc, &options)
            .await
            .context("kubeconfig")?;
        let client = Client::try_from(config)?;
        let mut input = Input::default();
        let c = &mut input.cluster;
        c.namespaces = list::<Namespace>(&client)
            .await
            .context("listing namespaces")?
            .into_iter()
            .map(Arc::new)
            .collect();
        c.pods = list_namespaced::<Pod>(&client)
            .await
            .context("listing pods")?
            .into_iter()
            .map(Arc::new)
            .collect();
        c.policies = list_namespaced::<NetworkPolicy>(&client)
            .await
            .context("listing networkpolicies")?
            .into_iter()
            .map(Arc::new)
            .collect();
        c.services = list_namespaced::<Service>(&client)
            .await
            .context("listing services")?
            .into_iter()
            .map(Arc::new)
            .collect();
        // Optional: without them, rule L009 knows service accounts from pods only, and L004
        // node addresses from the pods' status.hostIP.
        match list_namespaced::<ServiceAccount>(&client).await {
            Ok(sas) => {
                input.service_accounts = sas
                    .into_iter()
                    .map(|sa| {
                        (
                            sa.metadata.namespace.unwrap_or_default(),
                            sa.metadata.name.unwrap_or_default(),
                        )
                    })
                    .collect();
            }
            Err(e) => eprintln!("warning: listing serviceaccounts: {e:#} (skipped)"),
        }
        match list::<Node>(&client).await {
            Ok(nodes) => {
                input.node_ips = nodes
                    .iter()
                    .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
                    .flatten()
                    .filter_map(|a| a.address.parse().ok())
                    .collect();
            }
            Err(e) => eprintln!("warning: listing nodes: {e:#} (skipped)"),
        }
        Ok(input)
    })
}
