//! idemproxy: a gRPC idempotency sidecar. See ARCHITECTURE.md for the map of this crate.

pub mod admin;
pub mod caller;
pub mod config;
pub mod demo;
pub mod engine;
pub mod fds;
pub mod files;
pub mod inject;
pub mod injector;
pub mod key;
pub mod ops;
pub mod policy;
pub mod probe;
pub mod proxy;
pub mod record;
pub mod seal;
pub mod server;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod window;

/// Code generated from `proto/` at build time.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    /// The example payments API's descriptor set (annotations kept), for the demo and tests.
    pub const EXAMPLE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/example_descriptors.bin"));
    /// The admin API's descriptor set, served by reflection on the admin port.
    pub const ADMIN_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/admin_descriptors.bin"));
    /// The demo's subscriptions API's descriptor set (its key field annotated).
    pub const DEMO_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/demo_descriptors.bin"));
    /// The test upstream's descriptor set (`idemproxy.testing.v1.Ledger`, every call shape),
    /// so tests can give the sidecar descriptors of the service they run behind it.
    pub const TESTING_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/testing_descriptors.bin"));
    /// `google.rpc`: the error model idemproxy emits.
    pub mod google {
        pub mod rpc {
            include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
        }
    }
    /// `idemproxy.*` packages.
    pub mod idemproxy {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/idemproxy.v1.rs"));
        }
        pub mod demo {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/idemproxy.demo.v1.rs"));
            }
        }
        pub mod example {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/idemproxy.example.v1.rs"));
            }
        }
        pub mod testing {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/idemproxy.testing.v1.rs"));
            }
        }
    }
}
