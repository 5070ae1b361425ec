//! The example configurations in `deploy/examples` parse into the real configuration types, so
//! that what the documentation shows stays true.

// In tests a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

#[test]
fn example_configurations_parse() {
    let env = HashMap::new();
    let forms: onestop_forms::FormsConfig =
        onestop_platform::config::load(Some(&example("forms.toml")), &env).unwrap();
    assert_eq!(forms.server.listen.port(), 7101);
    let gateway: onestop_gateway::GatewayConfig =
        onestop_platform::config::load(Some(&example("gateway.toml")), &env).unwrap();
    assert!(gateway.routes.contains_key("onestop.forms.v1.FormsService"));
    onestop_gateway::policy::Policy::load(&example("policy.toml")).unwrap();
    let identity: onestop_identity::IdentityConfig =
        onestop_platform::config::load(Some(&example("identity.toml")), &env).unwrap();
    assert_eq!(identity.identity.providers.len(), 2);
    let routing: onestop_routing::RoutingConfig =
        onestop_platform::config::load(Some(&example("routing.toml")), &env).unwrap();
    assert_eq!(routing.routing.max_attempts, 5);
    assert!(routing.routing.eaddress_address.is_some());
    let eaddress: onestop_eaddress::EaddressConfig =
        onestop_platform::config::load(Some(&example("eaddress.toml")), &env).unwrap();
    assert_eq!(eaddress.eaddress.default_delivery_rule, "working-days:2");
    assert!(eaddress.eaddress.smtp.is_some());
    assert!(
        gateway
            .routes
            .contains_key("onestop.eaddress.v1.MessageService")
    );
    assert_eq!(
        gateway.gateway.method_deadlines_ms["onestop.routing.v1.InboxService/StreamInbox"],
        0
    );

    // An override from the environment wins over the file, and a misspelt key is an error.
    let env = HashMap::from([
        (
            "ONESTOP__DATABASE__URL".to_owned(),
            "sqlite://x.db".to_owned(),
        ),
        (
            "ONESTOP__SERVER__LIMITS__MAX_CONNECTIONS".to_owned(),
            "77".to_owned(),
        ),
        // A Kubernetes service link for a Service named onestop-forms: not ours.
        (
            "ONESTOP_FORMS_SERVICE_HOST".to_owned(),
            "10.0.0.1".to_owned(),
        ),
    ]);
    let forms: onestop_forms::FormsConfig =
        onestop_platform::config::load(Some(&example("forms.toml")), &env).unwrap();
    assert_eq!(forms.database.url, "sqlite://x.db");
    assert_eq!(forms.server.limits.max_connections, 77);
    let env = HashMap::from([("ONESTOP__DATABASE__ULR".to_owned(), "x".to_owned())]);
    let error = onestop_platform::config::load::<onestop_forms::FormsConfig>(
        Some(&example("forms.toml")),
        &env,
    )
    .unwrap_err();
    assert!(error.to_string().contains("ulr"), "{error}");
}
