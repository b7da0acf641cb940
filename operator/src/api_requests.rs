//! Every request the operator sends to the API server, counted and timed by verb and
//! resource: the tower layer under the operator's client, and the pure classification.
//!
//! These are the numbers that tell where reconcile time goes (issue 22) and what an
//! operator costs the API server, the way client-go's `rest_client_requests_total` does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response};

use crate::metrics::Metrics;

/// What one request was: a Kubernetes verb and the resource it addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCall<'a> {
    /// `get`, `list`, `watch`, `create`, `apply`, `patch`, `update`, `delete` or `other`.
    pub verb: &'static str,
    /// The resource, with its subresource: `pods`, `trainingjobs/status`, `events`.
    pub resource: &'a str,
    /// The subresource, when there is one (`status`).
    pub subresource: Option<&'a str>,
}

impl<'a> ApiCall<'a> {
    /// Classifies a request from its method, path, query and content type. Names and
    /// namespaces never become labels, so the label set stays bounded.
    pub fn classify(
        method: &Method,
        path: &'a str,
        query: &str,
        content_type: Option<&str>,
    ) -> Self {
        let parts = Parts::of(path);
        let rest = parts.rest();
        let resource = rest.first().copied().unwrap_or("");
        let named = rest.len() >= 2;
        let subresource = rest.get(2).copied();
        let watch = query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1");
        let verb = match *method {
            Method::GET if watch => "watch",
            Method::GET if named => "get",
            Method::GET => "list",
            Method::POST => "create",
            Method::PATCH
                if content_type.is_some_and(|c| c.starts_with("application/apply-patch")) =>
            {
                "apply"
            }
            Method::PATCH => "patch",
            Method::PUT => "update",
            Method::DELETE => "delete",
            _ => "other",
        };
        Self {
            verb,
            resource,
            subresource,
        }
    }

    /// `resource` or `resource/subresource`, the metric label.
    pub fn resource_label(&self) -> String {
        match self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.to_string(),
        }
    }
}

/// The path with its namespace and name replaced: `/api/v1/namespaces/{ns}/pods/{name}`.
pub fn path_template(path: &str) -> String {
    let parts = Parts::of(path);
    let mut template: Vec<&str> = parts.segments.clone();
    if parts.namespaced {
        template[parts.base - 1] = "{ns}";
    }
    if parts.rest().len() >= 2 {
        template[parts.base + 1] = "{name}";
    }
    format!("/{}", template.join("/"))
}

/// A request path cut where its resource starts.
struct Parts<'a> {
    segments: Vec<&'a str>,
    /// Index of the resource segment.
    base: usize,
    /// Whether `namespaces/<ns>/` comes before the resource.
    namespaced: bool,
}

impl<'a> Parts<'a> {
    fn of(path: &'a str) -> Self {
        let segments: Vec<&'a str> = path.trim_matches('/').split('/').collect();
        // /api/v1/... or /apis/<group>/<version>/...
        let mut base = match segments.first() {
            Some(&"api") => 2,
            Some(&"apis") => 3,
            _ => segments.len(),
        }
        .min(segments.len());
        let namespaced =
            matches!(&segments[base..], ["namespaces", _, tail @ ..] if !tail.is_empty());
        if namespaced {
            base += 2;
        }
        Self {
            segments,
            base,
            namespaced,
        }
    }

    fn rest(&self) -> &[&'a str] {
        &self.segments[self.base..]
    }
}

/// The tower layer that records every request in [`Metrics`]; goes on the operator's
/// client with `ClientBuilder::with_layer`.
#[derive(Clone)]
pub struct ApiRequestsLayer {
    metrics: Arc<Metrics>,
}

impl ApiRequestsLayer {
    /// A layer that records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower_layer::Layer<S> for ApiRequestsLayer {
    type Service = ApiRequests<S>;

    fn layer(&self, inner: S) -> ApiRequests<S> {
        ApiRequests {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`ApiRequestsLayer`] wraps around kube's stack.
#[derive(Clone)]
pub struct ApiRequests<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower_service::Service<Request<B>> for ApiRequests<S>
where
    S: tower_service::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let uri = request.uri();
        let call = ApiCall::classify(
            request.method(),
            uri.path(),
            uri.query().unwrap_or(""),
            content_type,
        );
        let (verb, resource) = (call.verb, call.resource_label());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            // Until the response head: for a watch that is the time to open it, not how
            // long it stayed open.
            let code = response.as_ref().ok().map(|r| r.status().as_u16());
            metrics.observe_api_request(verb, &resource, code, started.elapsed());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: Method, path: &str, query: &str, apply: bool) -> (String, String) {
        let content_type = apply.then_some("application/apply-patch+yaml");
        let call = ApiCall::classify(&method, path, query, content_type);
        (call.verb.to_string(), call.resource_label())
    }

    fn pair(verb: &str, resource: &str) -> (String, String) {
        (verb.to_string(), resource.to_string())
    }

    #[test]
    fn verbs_and_resources_come_from_method_path_and_query() {
        assert_eq!(
            call(
                Method::GET,
                "/api/v1/namespaces/ns/pods",
                "labelSelector=a",
                false
            ),
            pair("list", "pods")
        );
        assert_eq!(
            call(
                Method::GET,
                "/api/v1/pods",
                "watch=true&resourceVersion=5",
                false
            ),
            pair("watch", "pods")
        );
        assert_eq!(
            call(
                Method::PATCH,
                "/api/v1/namespaces/ns/pods/job-ps-0",
                "fieldManager=m",
                true
            ),
            pair("apply", "pods")
        );
        assert_eq!(
            call(
                Method::PATCH,
                "/apis/kubetrain.io/v1alpha1/namespaces/ns/trainingjobs/j/status",
                "",
                true
            ),
            pair("apply", "trainingjobs/status")
        );
        assert_eq!(
            call(
                Method::PATCH,
                "/apis/events.k8s.io/v1/namespaces/ns/events/e",
                "",
                false
            ),
            pair("patch", "events")
        );
        assert_eq!(
            call(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/ns/events",
                "",
                false
            ),
            pair("create", "events")
        );
        assert_eq!(
            call(Method::GET, "/api/v1/namespaces/ns/services/j", "", false),
            pair("get", "services")
        );
        assert_eq!(
            call(Method::DELETE, "/api/v1/namespaces/ns/pods/p", "", false),
            pair("delete", "pods")
        );
        assert_eq!(
            call(
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l",
                "",
                false
            ),
            pair("update", "leases")
        );
    }

    #[test]
    fn templates_hide_namespaces_and_names() {
        assert_eq!(
            path_template("/api/v1/namespaces/ns/pods/job-ps-0"),
            "/api/v1/namespaces/{ns}/pods/{name}"
        );
        assert_eq!(
            path_template("/apis/kubetrain.io/v1alpha1/namespaces/ns/trainingjobs/j/status"),
            "/apis/kubetrain.io/v1alpha1/namespaces/{ns}/trainingjobs/{name}/status"
        );
        assert_eq!(path_template("/api/v1/pods"), "/api/v1/pods");
        assert_eq!(
            path_template("/api/v1/namespaces/ns"),
            "/api/v1/namespaces/{name}"
        );
        assert_eq!(path_template("/version"), "/version");
    }

    #[test]
    fn a_namespace_itself_is_the_namespaces_resource() {
        assert_eq!(
            call(Method::GET, "/api/v1/namespaces/ns", "", false),
            pair("get", "namespaces")
        );
        assert_eq!(call(Method::GET, "/version", "", false), pair("list", ""));
    }
}
