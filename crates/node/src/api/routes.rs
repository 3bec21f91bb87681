//! Every route of the API is declared once, in its domain's `routes()`, as a read
//! (public), a write (needs the node's bearer key) or an inference route (the
//! node's key or a client key, see [`crate::keys`]). [`Routes`] builds the three
//! routers from those declarations and keeps the table, so a test can walk every
//! route and check that each write refuses a request without the key.

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, on};

use super::AppState;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Anyone who can reach the API (status and listings).
    Read,
    /// Only a caller with the node's API key (every change, secrets).
    Write,
    /// The node's API key or a client key: running a model, nothing else.
    Infer,
}

/// One declared route.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Route {
    /// HTTP method.
    #[serde(serialize_with = "method_name")]
    pub method: Method,
    /// Path pattern (`{id}` for a parameter).
    pub path: &'static str,
    /// Read or write.
    pub access: Access,
}

fn method_name<S: serde::Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

/// A domain's routes, split by access as they are declared.
#[derive(Default)]
pub(crate) struct Routes {
    pub(crate) read: Router<AppState>,
    pub(crate) write: Router<AppState>,
    pub(crate) infer: Router<AppState>,
    pub(crate) table: Vec<Route>,
}

fn filter(method: &Method) -> MethodFilter {
    match *method {
        Method::POST => MethodFilter::POST,
        Method::PUT => MethodFilter::PUT,
        Method::DELETE => MethodFilter::DELETE,
        Method::PATCH => MethodFilter::PATCH,
        _ => MethodFilter::GET,
    }
}

impl Routes {
    /// A public route.
    pub(crate) fn read<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(Access::Read, method, path, handler)
    }

    /// A route that needs the API key.
    pub(crate) fn write<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(Access::Write, method, path, handler)
    }

    /// A route that runs a model: the API key or a client key.
    pub(crate) fn infer<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add(Access::Infer, method, path, handler)
    }

    fn add<H, T>(mut self, access: Access, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let route = on(filter(&method), handler);
        match access {
            Access::Read => self.read = self.read.route(path, route),
            Access::Write => self.write = self.write.route(path, route),
            Access::Infer => self.infer = self.infer.route(path, route),
        }
        self.table.push(Route {
            method,
            path,
            access,
        });
        self
    }

    /// Both domains' routes together.
    pub(crate) fn merge(mut self, other: Routes) -> Self {
        self.read = self.read.merge(other.read);
        self.write = self.write.merge(other.write);
        self.infer = self.infer.merge(other.infer);
        self.table.extend(other.table);
        self
    }
}
