//! Split inference across peers. So far: the activation wire format
//! ([`activation`]); chaining, routing and failover come next.

pub mod activation;
