//! The configurations in `deploy/kubernetes` (the ConfigMaps' files) and `deploy/compose` parse
//! into the real configuration types, with every `ONESTOP__` override their manifests set, so
//! that what the manifests name exists in the code. `deploy/check/check.py` checks the rest
//! (rendering, schemas, ports, probes, mounts).

// In tests a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

const SERVICES: [&str; 5] = ["gateway", "forms", "identity", "routing", "eaddress"];

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Loads `file` as `service`'s configuration with `env` as the environment; returns the ports
/// of its `[server] listen` and `[admin] listen`.
fn load(service: &str, file: &Path, env: &HashMap<String, String>) -> (u16, Option<u16>) {
    let file = Some(file);
    let (server, admin) = match service {
        "gateway" => {
            let c: onestop_gateway::GatewayConfig =
                onestop_platform::config::load(file, env).unwrap();
            (c.server, c.admin)
        }
        "forms" => {
            let c: onestop_forms::FormsConfig = onestop_platform::config::load(file, env).unwrap();
            (c.server, c.admin)
        }
        "identity" => {
            let c: onestop_identity::IdentityConfig =
                onestop_platform::config::load(file, env).unwrap();
            (c.server, c.admin)
        }
        "routing" => {
            let c: onestop_routing::RoutingConfig =
                onestop_platform::config::load(file, env).unwrap();
            (c.server, c.admin)
        }
        "eaddress" => {
            let c: onestop_eaddress::EaddressConfig =
                onestop_platform::config::load(file, env).unwrap();
            (c.server, c.admin)
        }
        other => panic!("no service {other}"),
    };
    (server.listen.port(), admin.listen.map(|a| a.port()))
}

/// The `ONESTOP__` variables a manifest sets, by the service (a Deployment's container or a
/// compose service) that sets them, with their values (`$(VAR)` references made plain).
fn overrides(manifest: &str) -> HashMap<String, HashMap<String, String>> {
    let mut found: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut service = String::new();
    let lines: Vec<&str> = manifest.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        // A Deployment's container (`- name: forms`) or a compose service (`  forms:`).
        if let Some(name) = trimmed.strip_prefix("- name: ")
            && SERVICES.contains(&name)
        {
            service = name.to_owned();
        }
        if line.len() - trimmed.len() == 2
            && let Some(name) = trimmed.strip_suffix(':')
            && SERVICES.contains(&name)
        {
            service = name.to_owned();
        }
        let (name, value) = if let Some(name) = trimmed.strip_prefix("- name: ONESTOP__") {
            let value = lines
                .get(i + 1)
                .and_then(|next| next.trim_start().strip_prefix("value: "))
                .unwrap_or("x");
            (name, value)
        } else if let Some((name, value)) = trimmed
            .strip_prefix("ONESTOP__")
            .and_then(|rest| rest.split_once(": "))
        {
            (name, value)
        } else {
            continue;
        };
        assert!(!service.is_empty(), "{name} outside any service");
        let value = value.replace("$(DATABASE_PASSWORD)", "password");
        found
            .entry(service.clone())
            .or_default()
            .insert(format!("ONESTOP__{name}"), value);
    }
    found
}

#[test]
fn kubernetes_configurations_parse_with_their_overrides() {
    for service in SERVICES {
        let manifest =
            std::fs::read_to_string(deploy(&format!("kubernetes/base/{service}.yaml"))).unwrap();
        let env = overrides(&manifest).remove(service).unwrap_or_default();
        if service != "gateway" {
            assert!(env.contains_key("ONESTOP__DATABASE__URL"), "{service}");
        }
        let file = deploy(&format!("kubernetes/base/config/{service}.toml"));
        let (listen, admin) = load(service, &file, &env);
        assert!(
            manifest.contains(&format!("containerPort: {listen}")),
            "{service}: [server] listen {listen} is no containerPort"
        );
        let admin = admin.unwrap_or_else(|| panic!("{service}: no [admin] listen"));
        assert!(
            manifest.contains(&format!("containerPort: {admin}")),
            "{service}: [admin] listen {admin} is no containerPort"
        );
    }
    onestop_gateway::policy::Policy::load(&deploy("kubernetes/base/config/policy.toml")).unwrap();
}

#[test]
fn compose_configurations_parse_with_their_overrides() {
    let compose = std::fs::read_to_string(deploy("compose/compose.yaml")).unwrap();
    let mut env = overrides(&compose);
    for service in SERVICES {
        let env = env.remove(service).unwrap_or_default();
        let file = deploy(&format!("compose/config/{service}.toml"));
        let (_, admin) = load(service, &file, &env);
        let admin = admin.unwrap_or_else(|| panic!("{service}: no [admin] listen"));
        assert!(
            compose.contains(&format!("/dev/tcp/127.0.0.1/{admin}")),
            "{service}: no healthcheck on the admin port {admin}"
        );
    }
    assert!(env.is_empty(), "overrides of unknown services: {env:?}");
    onestop_gateway::policy::Policy::load(&deploy("compose/config/policy.toml")).unwrap();
}

#[test]
fn an_override_of_no_key_is_refused() {
    // The check above means something: a misspelt override fails to load.
    let env = HashMap::from([("ONESTOP__DATABASE__ULR".to_owned(), "x".to_owned())]);
    let result = onestop_platform::config::load::<onestop_forms::FormsConfig>(
        Some(&deploy("kubernetes/base/config/forms.toml")),
        &env,
    );
    assert!(result.is_err());
}
