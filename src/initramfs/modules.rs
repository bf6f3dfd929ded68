//! Picking kernel modules out of Talos's `rootfs.sqsh`: find `/usr/lib/modules/<kver>/`,
//! read `modules.dep`, `modules.builtin` and `modules.softdep`, and resolve the modules the appliance wants
//! into a load order (dependencies first). The `.ko` files are taken as they are: Talos
//! signs them and enforces signatures, so they must not be altered or recompressed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};

use anyhow::{bail, Context, Result};
use backhand::{FilesystemReader, InnerNode, SquashfsFileReader};

/// Modules the appliance tries to load. On Talos most are built in and get skipped;
/// `virtio_pci` is the virtio bus driver, which no module depends on, so it is named.
pub const APPLIANCE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "ext4",
    "vfat",
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "r8169",
    "vmxnet3",
    "8139too",
    "ahci",
    "nvme",
    "af_packet",
    "nf_tables",
    "nft_masq",
    "nft_nat",
    "nft_chain_nat",
    "nf_nat",
    "nf_conntrack",
    // The NAT's forward and input guards match `ct state` (built in on Talos).
    "nft_ct",
    // The ACPI power button, so the hypervisor's "shut down" works (built in on Talos).
    "button",
    "crc32c_generic",
    "crc32c_intel",
];

/// Where the modules live inside the Talos root filesystem.
pub const MODULES_ROOT: &str = "/usr/lib/modules";
const MODULES_DEP: &str = "modules.dep";
const MODULES_BUILTIN: &str = "modules.builtin";
/// `softdep <mod> pre: <names> post: <names>`, made by depmod from MODULE_SOFTDEP.
const MODULES_SOFTDEP: &str = "modules.softdep";
/// `alias <name> <mod>`: softdeps name aliases (e.g. `crc32c` for `crc32c_intel`).
const MODULES_ALIAS: &str = "modules.alias";
/// Suffixes a module file may carry after `.ko`.
const COMPRESSED_SUFFIXES: &[&str] = &[".xz", ".zst", ".gz"];

pub struct Module {
    /// Normalized name (`_`, not `-`).
    pub name: String,
    /// Path relative to `/usr/lib/modules/<kver>/`, e.g. `kernel/drivers/net/virtio_net.ko`.
    pub rel_path: String,
    pub data: Vec<u8>,
}

pub struct ModuleSet {
    pub kver: String,
    /// In load order: every module after all of its dependencies.
    pub modules: Vec<Module>,
    /// Wanted names that are built into the kernel.
    pub builtin: Vec<String>,
    /// Wanted names this kernel has neither as module nor built in.
    pub missing: Vec<String>,
}

/// `virtio-net` and `virtio_net` are the same module to the kernel.
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name from a path in `modules.dep`/`modules.builtin`.
fn name_from_path(path: &str) -> Result<String> {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = COMPRESSED_SUFFIXES
        .iter()
        .find_map(|s| base.strip_suffix(s))
        .unwrap_or(base);
    let stem = base
        .strip_suffix(".ko")
        .with_context(|| format!("{path:?} is not a kernel module path"))?;
    Ok(normalize_name(stem))
}

/// One line of `modules.dep`: module path and the paths of all its dependencies.
struct DepEntry {
    rel_path: String,
    deps: Vec<String>,
}

/// Parse `modules.dep` into name → entry.
fn parse_modules_dep(text: &str) -> Result<HashMap<String, DepEntry>> {
    let mut map = HashMap::new();
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (path, deps) = line
            .split_once(':')
            .with_context(|| format!("modules.dep line {}: no ':' in {line:?}", lineno + 1))?;
        let name = name_from_path(path.trim())
            .with_context(|| format!("modules.dep line {}", lineno + 1))?;
        let entry = DepEntry {
            rel_path: path.trim().to_string(),
            deps: deps.split_whitespace().map(str::to_string).collect(),
        };
        map.insert(name, entry);
    }
    Ok(map)
}

fn parse_modules_builtin(text: &str) -> Result<HashSet<String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| name_from_path(l).context("parsing modules.builtin"))
        .collect()
}

/// Soft dependencies of one module, as names to look up (module names or aliases).
#[derive(Default)]
struct SoftDeps {
    pre: Vec<String>,
    post: Vec<String>,
}

/// Parse `modules.softdep` the way kmod does: words after `pre:` load before the
/// module, after `post:` after it; words before either marker are ignored.
fn parse_modules_softdep(text: &str) -> HashMap<String, SoftDeps> {
    let mut map: HashMap<String, SoftDeps> = HashMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("softdep") {
            continue;
        }
        let Some(module) = words.next() else { continue };
        let entry = map.entry(normalize_name(module)).or_default();
        let mut list: Option<&mut Vec<String>> = None;
        for w in words {
            match w {
                "pre:" => list = Some(&mut entry.pre),
                "post:" => list = Some(&mut entry.post),
                name => {
                    if let Some(l) = list.as_deref_mut() {
                        l.push(normalize_name(name));
                    }
                }
            }
        }
    }
    map
}

/// Parse the plain-name lines of `modules.alias` (device aliases with wildcards are of
/// no use for softdeps) into alias → modules.
fn parse_modules_alias(text: &str) -> HashMap<String, Vec<String>> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("alias"), Some(alias), Some(module)) =
            (words.next(), words.next(), words.next())
        {
            if !alias.contains(['*', '?', '[']) {
                map.entry(normalize_name(alias))
                    .or_default()
                    .push(normalize_name(module));
            }
        }
    }
    map
}

/// Compute the load order for `wanted`, as kmod's modprobe does: a depth-first walk where
/// a module's `pre:` softdeps and its `modules.dep` dependencies (each line lists the whole
/// closure) come before it and its `post:` softdeps after it.
struct Resolver<'a> {
    deps: &'a HashMap<String, DepEntry>,
    softdeps: &'a HashMap<String, SoftDeps>,
    aliases: &'a HashMap<String, Vec<String>>,
    order: Vec<(String, String)>,
    done: HashSet<String>,
    visiting: Vec<String>,
}

impl Resolver<'_> {
    /// Modules a softdep name stands for; built-in or unknown names stand for none.
    fn lookup(&self, name: &str) -> Vec<String> {
        if self.deps.contains_key(name) {
            return vec![name.to_string()];
        }
        self.aliases
            .get(name)
            .map(|mods| {
                mods.iter()
                    .filter(|m| self.deps.contains_key(*m))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn visit_soft(&mut self, names: &[String]) -> Result<()> {
        for soft in names {
            for m in self.lookup(soft) {
                // Softdeps may point back up the chain; kmod skips those too.
                if self.visiting.contains(&m) {
                    continue;
                }
                let path = self.deps[&m].rel_path.clone();
                self.visit(&m, &path)?;
            }
        }
        Ok(())
    }

    fn visit(&mut self, name: &str, rel_path: &str) -> Result<()> {
        if self.done.contains(name) {
            return Ok(());
        }
        if self.visiting.iter().any(|v| v == name) {
            bail!(
                "dependency cycle in modules.dep: {} -> {name}",
                self.visiting.join(" -> ")
            );
        }
        self.visiting.push(name.to_string());
        let (pre, post) = self
            .softdeps
            .get(name)
            .map(|s| (s.pre.clone(), s.post.clone()))
            .unwrap_or_default();
        self.visit_soft(&pre)?;
        // A dependency with no line of its own is loaded as a leaf.
        let deps = self
            .deps
            .get(name)
            .map(|e| e.deps.clone())
            .unwrap_or_default();
        for dep_path in &deps {
            let dep = name_from_path(dep_path)
                .with_context(|| format!("dependencies of {name} in modules.dep"))?;
            self.visit(&dep, dep_path)?;
        }
        self.visiting.pop();
        self.done.insert(name.to_string());
        self.order.push((name.to_string(), rel_path.to_string()));
        self.visit_soft(&post)
    }
}

/// Turn a `modules.dep` path into one relative to the kver directory (old depmods wrote
/// absolute paths).
fn relative_module_path(path: &str, kver: &str) -> Result<String> {
    if !path.starts_with('/') {
        return Ok(path.to_string());
    }
    for root in ["/lib/modules", MODULES_ROOT] {
        if let Some(rel) = path.strip_prefix(&format!("{root}/{kver}/")) {
            return Ok(rel.to_string());
        }
    }
    bail!("module path {path} is outside the modules directory of {kver}")
}

/// Open the Talos root squashfs and read the modules of `wanted` (and their dependencies)
/// in load order. Built-in and unknown names are recorded, not errors.
pub fn select_modules(sqsh: File, wanted: &[&str]) -> Result<ModuleSet> {
    let fs = FilesystemReader::from_reader(BufReader::new(sqsh))
        .context("opening rootfs.sqsh as squashfs")?;

    let kver = find_kver(&fs)?;
    let moddir = format!("{MODULES_ROOT}/{kver}");
    let files: HashMap<String, &SquashfsFileReader> = fs
        .files()
        .filter_map(|node| match &node.inner {
            InnerNode::File(f) => {
                let p = node.fullpath.to_str()?;
                let rel = p.strip_prefix(&moddir)?.strip_prefix('/')?;
                Some((rel.to_string(), f))
            }
            _ => None,
        })
        .collect();
    let read = |rel: &str| -> Result<Vec<u8>> {
        let f = files
            .get(rel)
            .with_context(|| format!("{moddir}/{rel} not found in rootfs.sqsh"))?;
        let mut data = Vec::with_capacity(f.file_len());
        fs.file(f)
            .reader_checked()
            .and_then(|mut r| r.read_to_end(&mut data).map_err(Into::into))
            .with_context(|| format!("reading {moddir}/{rel} from rootfs.sqsh"))?;
        Ok(data)
    };

    let dep_text = String::from_utf8(read(MODULES_DEP)?)
        .with_context(|| format!("{moddir}/{MODULES_DEP} is not UTF-8"))?;
    let deps =
        parse_modules_dep(&dep_text).with_context(|| format!("parsing {moddir}/{MODULES_DEP}"))?;
    // The other index files are optional: without them there is simply nothing to add.
    let read_optional = |name: &str| -> Result<String> {
        if !files.contains_key(name) {
            return Ok(String::new());
        }
        String::from_utf8(read(name)?).with_context(|| format!("{moddir}/{name} is not UTF-8"))
    };
    let builtin_set = parse_modules_builtin(&read_optional(MODULES_BUILTIN)?)?;
    let softdeps = parse_modules_softdep(&read_optional(MODULES_SOFTDEP)?);
    let aliases = parse_modules_alias(&read_optional(MODULES_ALIAS)?);

    let mut resolver = Resolver {
        deps: &deps,
        softdeps: &softdeps,
        aliases: &aliases,
        order: Vec::new(),
        done: HashSet::new(),
        visiting: Vec::new(),
    };
    let mut builtin = Vec::new();
    let mut missing = Vec::new();
    for want in wanted {
        let name = normalize_name(want);
        if let Some(entry) = deps.get(&name) {
            resolver.visit(&name, &entry.rel_path)?;
        } else if builtin_set.contains(&name) {
            if !builtin.contains(&name) {
                builtin.push(name);
            }
        } else if !missing.contains(&name) {
            missing.push(name);
        }
    }

    let modules = resolver
        .order
        .into_iter()
        .map(|(name, path)| {
            let rel_path = relative_module_path(&path, &kver)?;
            let data = read(&rel_path)?;
            Ok(Module {
                name,
                rel_path,
                data,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ModuleSet {
        kver,
        modules,
        builtin,
        missing,
    })
}

/// The single directory under `/usr/lib/modules`.
fn find_kver(fs: &FilesystemReader) -> Result<String> {
    let mut kvers = BTreeMap::new();
    for node in fs.files() {
        if !matches!(node.inner, InnerNode::Dir(_)) {
            continue;
        }
        let Some(path) = node.fullpath.to_str() else {
            continue;
        };
        if let Some(kver) = path
            .strip_prefix(MODULES_ROOT)
            .and_then(|p| p.strip_prefix('/'))
        {
            if !kver.is_empty() && !kver.contains('/') {
                kvers.insert(kver.to_string(), ());
            }
        }
    }
    let kvers: Vec<_> = kvers.into_keys().collect();
    match kvers.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("rootfs.sqsh has no kernel modules directory under {MODULES_ROOT}"),
        many => bail!(
            "rootfs.sqsh has several kernel modules directories under {MODULES_ROOT}: {}",
            many.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_paths() {
        assert_eq!(
            name_from_path("kernel/a/virtio-net.ko").unwrap(),
            "virtio_net"
        );
        assert_eq!(name_from_path("kernel/a/x.ko.xz").unwrap(), "x");
        assert_eq!(name_from_path("kernel/a/x.ko.zst").unwrap(), "x");
        assert!(name_from_path("kernel/a/x.o").is_err());
    }

    #[test]
    fn resolves_depth_first_once() {
        let dep = "\
kernel/c.ko: kernel/b.ko kernel/a.ko
kernel/b.ko: kernel/a.ko
kernel/a.ko:
kernel/d-x.ko: kernel/a.ko
";
        let deps = parse_modules_dep(dep).unwrap();
        let (soft, alias) = (HashMap::new(), HashMap::new());
        let mut r = resolver(&deps, &soft, &alias);
        r.visit("c", "kernel/c.ko").unwrap();
        r.visit("d_x", "kernel/d-x.ko").unwrap();
        let names: Vec<_> = r.order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d_x"]);
    }

    fn resolver<'a>(
        deps: &'a HashMap<String, DepEntry>,
        softdeps: &'a HashMap<String, SoftDeps>,
        aliases: &'a HashMap<String, Vec<String>>,
    ) -> Resolver<'a> {
        Resolver {
            deps,
            softdeps,
            aliases,
            order: Vec::new(),
            done: HashSet::new(),
            visiting: Vec::new(),
        }
    }

    #[test]
    fn softdeps_by_name_and_alias() {
        let deps = parse_modules_dep(
            "k/lib.ko:\nk/impl-fast.ko:\nk/phy.ko:\nk/nic.ko:\nk/after.ko:\nk/user.ko: k/lib.ko\n",
        )
        .unwrap();
        let soft = parse_modules_softdep(
            "# comment\nsoftdep lib pre: algo\nsoftdep nic pre: phy builtin_thing post: after\nsoftdep user ignored\n",
        );
        let alias = parse_modules_alias(
            "alias algo impl_fast\nalias pci:v*d* nic\nalias algo builtin_algo\n",
        );
        assert!(!alias.contains_key("pci:v*d*"));
        let mut r = resolver(&deps, &soft, &alias);
        r.visit("user", "k/user.ko").unwrap();
        r.visit("nic", "k/nic.ko").unwrap();
        let names: Vec<_> = r.order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["impl_fast", "lib", "user", "phy", "nic", "after"]);
    }

    #[test]
    fn detects_cycles() {
        let deps = parse_modules_dep("x.ko: y.ko\ny.ko: x.ko\n").unwrap();
        let (soft, alias) = (HashMap::new(), HashMap::new());
        let mut r = resolver(&deps, &soft, &alias);
        assert!(r.visit("x", "x.ko").is_err());
        // A softdep pointing back up the chain is not an error.
        let deps = parse_modules_dep("a.ko:\nb.ko:\n").unwrap();
        let soft = parse_modules_softdep("softdep a pre: b\nsoftdep b post: a\n");
        let mut r = resolver(&deps, &soft, &alias);
        r.visit("a", "a.ko").unwrap();
        let names: Vec<_> = r.order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
    }
}
