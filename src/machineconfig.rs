//! A sanity check that the config going into an image is a Talos machine config, so a
//! talosconfig, a Kubernetes manifest or a half-filled template is caught at build time
//! instead of by a node that retries its download for hours.

use anyhow::{bail, Result};

use crate::sops::Value;

/// The only machine config version Talos has.
pub const CONFIG_VERSION: &str = "v1alpha1";
pub const MACHINE_TYPES: &[&str] = &["controlplane", "init", "worker"];

/// Check the documents of a config; returns warnings, errors if it is not a Talos
/// machine config. `talos_version` is the ISO's release (e.g. `v1.11.6`).
pub fn check(docs: &[Value], talos_version: &str) -> Result<Vec<String>> {
    // Talos 1.5+ streams put the v1alpha1 config beside documents with apiVersion/kind.
    let Some(cfg) = docs.iter().find(|d| d.get("version").is_some()) else {
        if docs.iter().any(|d| d.get("contexts").is_some()) {
            bail!("it is a talosconfig, not a machine config (pass it with --talosconfig)");
        }
        bail!(
            "it is not a Talos machine config: no document has `version: {CONFIG_VERSION}` (generate one with `talosctl gen config`, or pass --skip-config-check)"
        );
    };
    match cfg.get("version") {
        Some(Value::Str(v)) if v == CONFIG_VERSION => {}
        other => bail!(
            "it is not a Talos machine config: version is {}, expected {CONFIG_VERSION}",
            describe(other)
        ),
    }
    let machine = cfg.get("machine");
    if !matches!(machine, Some(Value::Map(_))) {
        bail!("it is not a Talos machine config: it has no machine section");
    }
    match machine.and_then(|m| m.get("type")) {
        Some(Value::Str(t)) if MACHINE_TYPES.contains(&t.as_str()) => {}
        other => bail!(
            "machine.type is {}, expected one of {}",
            describe(other),
            MACHINE_TYPES.join(", ")
        ),
    }
    if !matches!(cfg.get("cluster"), Some(Value::Map(_))) {
        bail!("it is not a complete Talos machine config: it has no cluster section");
    }

    let mut warnings = Vec::new();
    let install = machine.and_then(|m| m.get("install"));
    let has = |k: &str| {
        install
            .and_then(|i| i.get(k))
            .is_some_and(|v| !matches!(v, Value::Null))
    };
    if !has("disk") && !has("diskSelector") {
        warnings.push(
            "machine.install has neither disk nor diskSelector: Talos will not know which disk to install to".to_string(),
        );
    }
    if let Some(Value::Str(image)) = install.and_then(|i| i.get("image")) {
        if let Some(tag) = image_tag(image) {
            if tag.starts_with('v') && tag != talos_version {
                warnings.push(format!(
                    "machine.install.image {image} installs Talos {tag}, but the ISO is {talos_version}"
                ));
            }
        }
    }
    Ok(warnings)
}

fn describe(v: Option<&Value>) -> String {
    match v {
        None => "missing".into(),
        Some(Value::Str(s)) => format!("{s:?}"),
        Some(other) => format!("{other:?}"),
    }
}

/// The tag of an image reference: `ghcr.io/siderolabs/installer:v1.11.6@sha256:…` →
/// `v1.11.6`. `None` without a tag (a registry port is not a tag).
fn image_tag(image: &str) -> Option<&str> {
    let name = image.split('@').next()?;
    let last = name.rsplit('/').next()?;
    last.split_once(':').map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sops::yaml::parse_stream;

    fn run(text: &str) -> Result<Vec<String>> {
        check(&parse_stream(text).unwrap(), "v1.11.6")
    }

    #[test]
    fn accepts_a_config_and_warns() {
        let ok = "version: v1alpha1\nmachine:\n  type: worker\n  install:\n    disk: /dev/sda\n    image: ghcr.io/siderolabs/installer:v1.11.6\ncluster: {a: 1}\n---\napiVersion: v1alpha1\nkind: HostnameConfig\n";
        assert!(run(ok).unwrap().is_empty());
        let w = run("machine:\n  type: init\n  install:\n    image: localhost:5000/installer:v1.10.0@sha256:ab\nversion: v1alpha1\ncluster: {}\n").unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("neither disk nor diskSelector"));
        assert!(w[1].contains("v1.10.0") && w[1].contains("v1.11.6"));
    }

    #[test]
    fn rejects_what_is_not_a_machine_config() {
        let e = |t: &str| run(t).unwrap_err().to_string();
        assert!(e("context: x\ncontexts: {}\n").contains("talosconfig"));
        assert!(e("apiVersion: v1\nkind: Pod\n").contains("not a Talos machine config"));
        assert!(e("version: v2\nmachine: {type: worker}\ncluster: {}\n").contains("v2"));
        assert!(e("version: v1alpha1\nmachine: {type: router}\ncluster: {}\n").contains("router"));
        assert!(e("version: v1alpha1\nmachine: {type: worker}\n").contains("no cluster"));
        assert_eq!(image_tag("registry:5000/img"), None);
    }
}
