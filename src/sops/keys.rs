//! Age identities, found where sops looks for them, and the data key they unwrap.
//!
//! Sources, all of which are read: `--age-key-file`, `SOPS_AGE_KEY` (the keys
//! themselves), `SOPS_AGE_KEY_FILE`, `SOPS_AGE_KEY_CMD` (a command printing keys), then
//! `$XDG_CONFIG_HOME/sops/age/keys.txt` (default `~/.config/sops/age/keys.txt`). For
//! `ssh-ed25519`/`ssh-rsa` recipients also `SOPS_AGE_SSH_PRIVATE_KEY_FILE`, else
//! `~/.ssh/id_ed25519` and `~/.ssh/id_rsa`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

use super::cipher::DataKey;
use super::metadata::Metadata;

pub const ENV_KEY: &str = "SOPS_AGE_KEY";
pub const ENV_KEY_FILE: &str = "SOPS_AGE_KEY_FILE";
pub const ENV_KEY_CMD: &str = "SOPS_AGE_KEY_CMD";
pub const ENV_SSH_KEY_FILE: &str = "SOPS_AGE_SSH_PRIVATE_KEY_FILE";
const SECRET_PREFIX: &str = "AGE-SECRET-KEY-1";
/// Key files larger than this are not key files.
const MAX_KEY_FILE: u64 = 16 << 20;

/// Where to look for keys beyond the environment.
#[derive(Debug, Clone, Default)]
pub struct KeyOptions {
    /// `--age-key-file`: read first, and an error if it cannot be read.
    pub age_key_file: Option<PathBuf>,
}

/// The identities found, with a public description of each for error messages.
#[derive(Default)]
pub struct Identities {
    x25519: Vec<age::x25519::Identity>,
    ssh: Vec<age::ssh::Identity>,
    /// Public parts only: `age1… (from SOURCE)`.
    pub described: Vec<String>,
    /// Sources that were looked at and why they gave nothing.
    pub notes: Vec<String>,
}

fn user_config_dir() -> Option<PathBuf> {
    match std::env::var_os("XDG_CONFIG_HOME") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".config")),
    }
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// The default key file sops reads.
pub fn default_key_file() -> Option<PathBuf> {
    user_config_dir().map(|d| d.join("sops/age/keys.txt"))
}

fn read_secret_file(path: &Path) -> Result<Zeroizing<String>> {
    let mut f = std::fs::File::open(path)?;
    let mut s = Zeroizing::new(String::new());
    f.by_ref()
        .take(MAX_KEY_FILE)
        .read_to_string(&mut s)
        .context("reading it as text")?;
    Ok(s)
}

impl Identities {
    /// Parse age key file text (`AGE-SECRET-KEY-1…` lines; `#` comments).
    fn add_text(&mut self, text: &str, source: &str) {
        let before = self.x25519.len();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if !line.starts_with(SECRET_PREFIX) {
                self.notes.push(format!(
                    "{source}: skipped a line that is not an X25519 age key (plugin keys are not supported)"
                ));
                continue;
            }
            match age::x25519::Identity::from_str(line) {
                Ok(id) => {
                    self.described
                        .push(format!("{} (from {source})", id.to_public()));
                    self.x25519.push(id);
                }
                Err(_) => self
                    .notes
                    .push(format!("{source}: skipped a malformed age key")),
            }
        }
        if self.x25519.len() == before {
            self.notes.push(format!("{source}: no age keys in it"));
        }
    }

    fn add_file(&mut self, path: &Path, source: &str) {
        match read_secret_file(path) {
            Ok(text) => self.add_text(&text, &format!("{source} {}", path.display())),
            Err(e) => self
                .notes
                .push(format!("{source} {}: {e:#}", path.display())),
        }
    }

    fn add_ssh_file(&mut self, path: &Path, source: &str) {
        let text = match read_secret_file(path) {
            Ok(t) => t,
            Err(e) => {
                self.notes
                    .push(format!("{source} {}: {e:#}", path.display()));
                return;
            }
        };
        let name = path.display().to_string();
        match age::ssh::Identity::from_buffer(text.as_bytes(), Some(name.clone())) {
            Ok(id @ age::ssh::Identity::Unencrypted(_)) => {
                // The public half is not exposed by age; name the key by its .pub file.
                let public = std::fs::read_to_string(format!("{name}.pub"))
                    .ok()
                    .and_then(|p| {
                        let mut f = p.split_whitespace();
                        Some(format!("{} {}", f.next()?, f.next()?))
                    })
                    .unwrap_or_else(|| "ssh key".to_string());
                self.described
                    .push(format!("{public} (from {source} {name})"));
                self.ssh.push(id);
            }
            Ok(age::ssh::Identity::Encrypted(_)) => self.notes.push(format!(
                "{source} {name}: passphrase-protected SSH keys are not supported"
            )),
            Ok(age::ssh::Identity::Unsupported(_)) => self
                .notes
                .push(format!("{source} {name}: unsupported SSH key type")),
            Err(e) => self
                .notes
                .push(format!("{source} {name}: not an SSH private key ({e})")),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.x25519.is_empty() && self.ssh.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.x25519
            .iter()
            .map(|i| i as &dyn age::Identity)
            .chain(self.ssh.iter().map(|i| i as &dyn age::Identity))
    }
}

/// Gather identities from every source. `ssh` also loads SSH keys (the file has SSH
/// recipients).
pub fn load(opts: &KeyOptions, ssh: bool) -> Result<Identities> {
    let mut ids = Identities::default();
    let unset: Vec<&str> = [ENV_KEY, ENV_KEY_FILE, ENV_KEY_CMD]
        .into_iter()
        .filter(|v| std::env::var_os(v).is_none_or(|x| x.is_empty()))
        .collect();
    if !unset.is_empty() {
        ids.notes.push(format!("{} unset", unset.join(", ")));
    }
    if let Some(p) = &opts.age_key_file {
        let text = read_secret_file(p)
            .with_context(|| format!("reading --age-key-file {}", p.display()))?;
        ids.add_text(&text, &format!("--age-key-file {}", p.display()));
    }
    if let Some(k) = std::env::var_os(ENV_KEY) {
        let k = Zeroizing::new(k.to_string_lossy().into_owned());
        ids.add_text(&k, ENV_KEY);
    }
    if let Some(p) = std::env::var_os(ENV_KEY_FILE).filter(|p| !p.is_empty()) {
        ids.add_file(Path::new(&p), ENV_KEY_FILE);
    }
    if let Some(cmd) = std::env::var_os(ENV_KEY_CMD).filter(|c| !c.is_empty()) {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let text = Zeroizing::new(String::from_utf8_lossy(&o.stdout).into_owned());
                let mut stdout = o.stdout;
                zeroize::Zeroize::zeroize(&mut stdout);
                ids.add_text(&text, ENV_KEY_CMD);
            }
            Ok(o) => ids
                .notes
                .push(format!("{ENV_KEY_CMD} failed ({})", o.status)),
            Err(e) => ids.notes.push(format!("{ENV_KEY_CMD} could not run: {e}")),
        }
    }
    match default_key_file() {
        Some(p) if p.exists() => ids.add_file(&p, "default key file"),
        Some(p) => ids
            .notes
            .push(format!("default key file {}: not found", p.display())),
        None => ids
            .notes
            .push("no HOME or XDG_CONFIG_HOME for the default key file".into()),
    }
    if ssh {
        if let Some(p) = std::env::var_os(ENV_SSH_KEY_FILE).filter(|p| !p.is_empty()) {
            ids.add_ssh_file(Path::new(&p), ENV_SSH_KEY_FILE);
        } else if let Some(h) = home() {
            for name in [".ssh/id_ed25519", ".ssh/id_rsa"] {
                let p = h.join(name);
                if p.exists() {
                    ids.add_ssh_file(&p, "SSH key");
                }
            }
        }
    }
    Ok(ids)
}

/// Unwrap the data key with the first recipient entry one of our identities opens.
pub fn data_key(meta: &Metadata, ids: &Identities) -> Result<DataKey> {
    if meta.age.is_empty() {
        if meta.other_keys.is_empty() {
            bail!("the sops section lists no recipients");
        }
        bail!(
            "it is encrypted only to {} keys; mkappliance decrypts age recipients only: add an age recipient with `sops updatekeys` or `sops -r --add-age`",
            meta.other_keys.join("/")
        );
    }
    let recipients: Vec<&str> = meta.age.iter().map(|a| a.recipient.as_str()).collect();
    if ids.is_empty() {
        bail!(
            "no age key found to decrypt it (recipients: {}): set SOPS_AGE_KEY_FILE or pass --age-key-file ({})",
            recipients.join(", "),
            ids.notes.join("; ")
        );
    }
    let mut failures = Vec::new();
    for entry in &meta.age {
        let armored = age::armor::ArmoredReader::new(entry.enc.as_bytes());
        let decryptor = match age::Decryptor::new(armored) {
            Ok(d) => d,
            Err(e) => {
                failures.push(format!("{}: {e}", entry.recipient));
                continue;
            }
        };
        match decryptor.decrypt(ids.iter()) {
            Ok(mut r) => {
                let mut key = Zeroizing::new(Vec::with_capacity(32));
                r.read_to_end(&mut key)
                    .with_context(|| format!("decrypting the data key for {}", entry.recipient))?;
                return DataKey::from_slice(&key);
            }
            Err(age::DecryptError::NoMatchingKeys) => {}
            Err(e) => failures.push(format!("{}: {e}", entry.recipient)),
        }
    }
    let mut msg = format!(
        "none of the age keys tried ({}) matches its recipients ({})",
        ids.described.join(", "),
        recipients.join(", ")
    );
    if !failures.is_empty() {
        msg.push_str(&format!("; errors: {}", failures.join("; ")));
    }
    bail!(msg)
}
