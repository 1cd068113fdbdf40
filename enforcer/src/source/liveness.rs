//! The watchers' heartbeats. kube's watcher keeps bookmarks and watch restarts to itself, so a
//! quiet watch would look the same as a hung one from its event stream alone; the heartbeats
//! are beaten beneath it instead, in the API client: every response to a GET of a watched
//! resource, and every chunk of its body (events, and the bookmarks the API server sends about
//! once a minute), beats that resource's heartbeat. The watch streams beat them too, on each
//! event and error (an unreachable API server is retried, not stuck).

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::observe::heartbeat::{Heartbeat, Heartbeats};

/// One heartbeat per watched resource, by the plural name that ends its API path.
#[derive(Clone, Debug, Default)]
pub struct WatchBeats {
    by_resource: BTreeMap<&'static str, Arc<Heartbeat>>,
}

impl WatchBeats {
    /// Heartbeats `watch RESOURCE` for each of `resources`, stale after `bound` without a beat.
    pub fn register(heartbeats: &Heartbeats, resources: &[&'static str], bound: Duration) -> Self {
        Self {
            by_resource: resources
                .iter()
                .map(|r| (*r, heartbeats.register(format!("watch {r}"), bound)))
                .collect(),
        }
    }

    /// Beats `resource`'s heartbeat, if it has one.
    pub fn beat(&self, resource: &str) {
        if let Some(hb) = self.by_resource.get(resource) {
            hb.beat();
        }
    }

    /// `resource`'s heartbeat.
    pub fn heartbeat(&self, resource: &str) -> Option<&Arc<Heartbeat>> {
        self.by_resource.get(resource)
    }

    /// The heartbeat of a request: a GET whose path ends in a watched resource (a list or a
    /// watch of it, `/api/v1/pods`, `/apis/networking.k8s.io/v1/networkpolicies`).
    fn of<B>(&self, req: &Request<B>) -> Option<Arc<Heartbeat>> {
        if req.method() != http::Method::GET {
            return None;
        }
        let last = req.uri().path().rsplit('/').next()?;
        self.by_resource.get(last).cloned()
    }
}

/// The client middleware beating [`WatchBeats`].
#[derive(Clone)]
pub struct Beating<S> {
    inner: S,
    beats: WatchBeats,
}

impl<S> Beating<S> {
    pub fn new(inner: S, beats: WatchBeats) -> Self {
        Self { inner, beats }
    }
}

impl<S, ReqB, B> tower::Service<Request<ReqB>> for Beating<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<BeatingBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let beat = self.beats.of(&req);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            if let Some(hb) = &beat {
                hb.beat();
            }
            Ok(res.map(|inner| BeatingBody { inner, beat }))
        })
    }
}

/// A response body that beats on every frame it yields.
pub struct BeatingBody<B> {
    inner: B,
    beat: Option<Arc<Heartbeat>>,
}

impl<B: HttpBody + Unpin> HttpBody for BeatingBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(_))), Some(hb)) = (&polled, &self.beat) {
            hb.beat();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The in-cluster (or KUBECONFIG) client, beating `beats`.
pub async fn client(beats: WatchBeats) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let config = kube::Config::infer()
        .await
        .context("kube config (in-cluster config or KUBECONFIG)")?;
    let builder = kube::client::ClientBuilder::try_from(config)
        .context("kube client")?
        .with_layer(&tower::layer::layer_fn(move |s| {
            Beating::new(s, beats.clone())
        }));
    Ok(builder.build())
}
