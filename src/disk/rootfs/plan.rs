//! What goes where: inode numbers, directory contents and block allocation.
//!
//! [`Layout::new`] depends only on the tree; [`Layout::allocate`] places it on a given
//! [`Geometry`]. Both are pure, so `min_size` can try sizes without writing anything.

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{bail, Result};

use super::geometry::Geometry;
use super::ondisk::{dirent_len, INODE_EXTENTS, LEAF_EXTENTS};
use super::{BLOCK_SIZE, FIRST_INO, LOST_FOUND_BLOCKS, LOST_FOUND_INO, ROOT_INO};
use crate::tree::{Content, FileTree, Kind};

const LOST_FOUND: &str = "lost+found";
const LOST_FOUND_MODE: u32 = 0o700;
const ROOT_MODE: u32 = 0o755;
const S_IFDIR: u16 = 0o040000;
const S_IFREG: u16 = 0o100000;
const S_IFLNK: u16 = 0o120000;
const FT_REG: u8 = 1;
const FT_DIR: u8 = 2;
const FT_SYMLINK: u8 = 7;
const MAX_NAME: usize = 255;
/// A symlink target up to this long lives in `i_block` itself ("fast" symlink).
pub(super) const FAST_SYMLINK_MAX: usize = 59;
/// Longest symlink target (one block, including the kernel's terminating NUL).
const MAX_SYMLINK: usize = BLOCK_SIZE as usize - 1;
/// Most blocks one extent maps (initialized extents).
const MAX_EXTENT_LEN: u64 = 32768;
/// With `dir_nlink`, a directory with more subdirectories than this has link count 1.
const MAX_LINKS: u64 = 65000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Extent {
    pub logical: u32,
    pub start: u64,
    pub len: u32,
}

pub(super) struct DirEntry<'t> {
    pub name: &'t str,
    pub ino: u64,
    pub ftype: u8,
}

pub(super) enum Body<'t> {
    /// Entries (`.` and `..` first, then sorted by name) and the range of them in each block;
    /// blocks past the last range are empty.
    Dir {
        entries: Vec<DirEntry<'t>>,
        blocks: Vec<Range<usize>>,
    },
    File(&'t Content),
    FastSymlink(&'t str),
    SlowSymlink(&'t str),
}

pub(super) struct Node<'t> {
    pub ino: u64,
    /// Path in the tree ("" for the root), for error messages.
    pub path: &'t str,
    /// Full `i_mode`: type and permission bits.
    pub mode: u16,
    pub links: u16,
    pub size: u64,
    pub body: Body<'t>,
    /// Data blocks (the file's content, the directory's blocks).
    pub data_blocks: u64,
    /// Set by [`Layout::allocate`].
    pub extents: Vec<Extent>,
    /// Extent tree leaf blocks, when the extents do not fit in the inode.
    pub leaves: Vec<u64>,
}

impl Node<'_> {
    pub fn allocated_blocks(&self) -> u64 {
        self.data_blocks + self.leaves.len() as u64
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir { .. })
    }
}

/// Every inode of the filesystem, in inode number order (which is also allocation order).
pub(super) struct Layout<'t> {
    pub nodes: Vec<Node<'t>>,
}

/// Split directory entries into blocks, first fit in order.
fn pack(entries: &[DirEntry<'_>]) -> Vec<Range<usize>> {
    let mut blocks = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, e) in entries.iter().enumerate() {
        let len = dirent_len(e.name.len());
        if used + len > BLOCK_SIZE as usize {
            blocks.push(start..i);
            (start, used) = (i, 0);
        }
        used += len;
    }
    blocks.push(start..entries.len());
    blocks
}

fn dir_node<'t>(
    ino: u64,
    path: &'t str,
    mode: u32,
    entries: Vec<DirEntry<'t>>,
    min_blocks: u64,
) -> Node<'t> {
    let subdirs = entries[2..].iter().filter(|e| e.ftype == FT_DIR).count() as u64;
    let links = if 2 + subdirs > MAX_LINKS {
        1
    } else {
        2 + subdirs
    };
    let blocks = pack(&entries);
    let data_blocks = (blocks.len() as u64).max(min_blocks);
    Node {
        ino,
        path,
        mode: S_IFDIR | (mode & 0o7777) as u16,
        links: links as u16,
        size: data_blocks * BLOCK_SIZE,
        body: Body::Dir { entries, blocks },
        data_blocks,
        extents: Vec::new(),
        leaves: Vec::new(),
    }
}

impl<'t> Layout<'t> {
    pub fn new(tree: &'t FileTree) -> Result<Self> {
        // Inode numbers in path order after the reserved ones. A `lost+found` in the tree
        // is only accepted as an empty directory: ours takes its place.
        let mut inos: HashMap<&str, u64> = HashMap::new();
        let mut next = FIRST_INO + 1;
        let mut entries = Vec::new();
        for (path, entry) in tree.iter() {
            if path == LOST_FOUND {
                if !matches!(entry.kind, Kind::Dir) || !tree.children(path).is_empty() {
                    bail!(
                        "{LOST_FOUND} is reserved: the tree may only have it as an empty directory"
                    );
                }
                continue;
            }
            let name = path.rsplit_once('/').map_or(path, |(_, n)| n);
            if name.len() > MAX_NAME {
                bail!("{path}: name longer than {MAX_NAME} bytes");
            }
            if name.contains('\0') {
                bail!("{path:?}: NUL in a file name");
            }
            inos.insert(path, next);
            entries.push((path, entry, next));
            next += 1;
        }
        if next - 1 > u64::from(u32::MAX) {
            bail!("too many files: {} inodes", next - 1);
        }

        // Children of every directory, in sorted order (the tree iterates in path order,
        // and among siblings that is name order).
        let dot = |ino, parent| {
            vec![
                DirEntry {
                    name: ".",
                    ino,
                    ftype: FT_DIR,
                },
                DirEntry {
                    name: "..",
                    ino: parent,
                    ftype: FT_DIR,
                },
            ]
        };
        let mut children: HashMap<u64, Vec<DirEntry<'t>>> = HashMap::new();
        children.insert(ROOT_INO, dot(ROOT_INO, ROOT_INO));
        for &(path, entry, ino) in &entries {
            let (parent, name) = match path.rsplit_once('/') {
                Some((p, n)) => (inos[p], n),
                None => (ROOT_INO, path),
            };
            let ftype = match entry.kind {
                Kind::Dir => {
                    children.insert(ino, dot(ino, parent));
                    FT_DIR
                }
                Kind::File(_) => FT_REG,
                Kind::Symlink(_) => FT_SYMLINK,
            };
            children
                .get_mut(&parent)
                .expect("parents precede children in path order")
                .push(DirEntry { name, ino, ftype });
        }
        let mut root = children.remove(&ROOT_INO).expect("root entries");
        root.push(DirEntry {
            name: LOST_FOUND,
            ino: LOST_FOUND_INO,
            ftype: FT_DIR,
        });
        root[2..].sort_by(|a, b| a.name.cmp(b.name));

        let mut nodes = Vec::with_capacity(entries.len() + 2);
        nodes.push(dir_node(ROOT_INO, "", ROOT_MODE, root, 1));
        let lost_found = dot(LOST_FOUND_INO, ROOT_INO);
        nodes.push(dir_node(
            LOST_FOUND_INO,
            LOST_FOUND,
            LOST_FOUND_MODE,
            lost_found,
            LOST_FOUND_BLOCKS,
        ));
        for (path, entry, ino) in entries {
            let node = match &entry.kind {
                Kind::Dir => {
                    let list = children.remove(&ino).expect("directory entries");
                    dir_node(ino, path, entry.mode, list, 1)
                }
                Kind::File(content) => {
                    let size = content.len();
                    Node {
                        ino,
                        path,
                        mode: S_IFREG | (entry.mode & 0o7777) as u16,
                        links: 1,
                        size,
                        body: Body::File(content),
                        data_blocks: size.div_ceil(BLOCK_SIZE),
                        extents: Vec::new(),
                        leaves: Vec::new(),
                    }
                }
                Kind::Symlink(target) => {
                    if target.is_empty() || target.len() > MAX_SYMLINK || target.contains('\0') {
                        bail!(
                            "{path}: symlink target must be 1 to {MAX_SYMLINK} bytes without NUL"
                        );
                    }
                    let fast = target.len() <= FAST_SYMLINK_MAX;
                    Node {
                        ino,
                        path,
                        mode: S_IFLNK | (entry.mode & 0o7777) as u16,
                        links: 1,
                        size: target.len() as u64,
                        body: if fast {
                            Body::FastSymlink(target)
                        } else {
                            Body::SlowSymlink(target)
                        },
                        data_blocks: u64::from(!fast),
                        extents: Vec::new(),
                        leaves: Vec::new(),
                    }
                }
            };
            nodes.push(node);
        }
        Ok(Layout { nodes })
    }

    /// Highest inode number in use (inodes `1..=last_ino` are all in use).
    pub fn last_ino(&self) -> u64 {
        self.nodes
            .last()
            .map_or(FIRST_INO, |n| n.ino.max(FIRST_INO))
    }

    /// Data blocks of all inodes (a lower bound of what allocation takes).
    pub fn data_blocks(&self) -> u64 {
        self.nodes.iter().map(|n| n.data_blocks).sum()
    }

    /// Allocate every inode's blocks in inode order, contiguously, skipping group metadata.
    /// Returns the block after the last one allocated; past `geo.blocks_count` means the
    /// tree does not fit (allocation then goes on as if the disk were longer, so the caller
    /// learns by how much).
    pub fn allocate(&mut self, geo: &Geometry) -> Result<u64> {
        let mut alloc = Allocator {
            geo,
            next: geo.data_start(0),
        };
        for node in &mut self.nodes {
            node.extents = alloc.extents(node.data_blocks);
            node.leaves.clear();
            if node.extents.len() > INODE_EXTENTS {
                let leaves = node.extents.len().div_ceil(LEAF_EXTENTS);
                if leaves > INODE_EXTENTS {
                    bail!(
                        "{}: too many extents ({}) for a depth-1 extent tree",
                        node.path,
                        node.extents.len()
                    );
                }
                for _ in 0..leaves {
                    node.leaves.push(alloc.runs(1)[0].start);
                }
            }
        }
        Ok(alloc.next)
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Run {
    start: u64,
    len: u64,
}

/// Hands out data blocks in block order.
struct Allocator<'g> {
    geo: &'g Geometry,
    next: u64,
}

impl Allocator<'_> {
    fn runs(&mut self, mut n: u64) -> Vec<Run> {
        let geo = self.geo;
        let mut runs = Vec::new();
        while n > 0 {
            if self.next >= geo.blocks_count {
                // Past the end: keep counting so the caller knows the shortfall.
                runs.push(Run {
                    start: self.next,
                    len: n,
                });
                self.next += n;
                break;
            }
            let g = self.next / super::BLOCKS_PER_GROUP;
            self.next = self.next.max(geo.data_start(g));
            let end = geo.group_start(g) + geo.group_len(g);
            let take = n.min(end - self.next);
            if take > 0 {
                runs.push(Run {
                    start: self.next,
                    len: take,
                });
            }
            self.next += take;
            n -= take;
        }
        runs
    }

    fn extents(&mut self, n: u64) -> Vec<Extent> {
        let mut extents = Vec::new();
        let mut logical = 0u64;
        for run in self.runs(n) {
            let mut done = 0;
            while done < run.len {
                let len = (run.len - done).min(MAX_EXTENT_LEN);
                extents.push(Extent {
                    logical: logical as u32,
                    start: run.start + done,
                    len: len as u32,
                });
                logical += len;
                done += len;
            }
        }
        extents
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Content, FILE_MODE};

    #[test]
    fn inodes_children_and_links() {
        let mut t = FileTree::new();
        t.add_file("b/x", Content::bytes("x"), FILE_MODE).unwrap();
        t.add_dir("b/sub", 0o750).unwrap();
        t.add_symlink("a", "b/x").unwrap();
        let l = Layout::new(&t).unwrap();
        let inos: Vec<u64> = l.nodes.iter().map(|n| n.ino).collect();
        assert_eq!(inos, [2, 11, 12, 13, 14, 15]);
        assert_eq!(l.last_ino(), 15);
        let Body::Dir { entries, .. } = &l.nodes[0].body else {
            panic!()
        };
        let names: Vec<&str> = entries.iter().map(|e| e.name).collect();
        assert_eq!(names, [".", "..", "a", "b", "lost+found"]);
        assert_eq!(l.nodes[0].links, 4); // ., b/.., lost+found/..
        assert_eq!(l.nodes[3].path, "b");
        assert_eq!(l.nodes[3].links, 3);
        assert_eq!(l.nodes[3].mode, 0o040755);
        assert_eq!(l.nodes[1].data_blocks, LOST_FOUND_BLOCKS);
    }

    #[test]
    fn big_directories_span_blocks() {
        let mut t = FileTree::new();
        for i in 0..1000 {
            // 8 + 12 bytes per entry: 204 per block.
            t.add_file(&format!("d/{i:012}"), Content::bytes(""), FILE_MODE)
                .unwrap();
        }
        let l = Layout::new(&t).unwrap();
        let d = &l.nodes[2];
        let Body::Dir { blocks, .. } = &d.body else {
            panic!()
        };
        // 1002 entries: `.` and `..` take 12 bytes each, so the first block holds them and
        // (4096 - 24) / 20 = 203 names; the other 797 names need 4 more blocks.
        assert_eq!(blocks.len(), 5);
        assert_eq!(blocks[0], 0..205);
        assert_eq!(blocks[1], 205..409);
        assert_eq!(d.size, 5 * BLOCK_SIZE);
    }

    #[test]
    fn allocation_skips_group_metadata() {
        let mut t = FileTree::new();
        let big = 40000 * BLOCK_SIZE;
        t.add_file(
            "big",
            Content::Path {
                path: "/nonexistent".into(),
                len: big,
            },
            FILE_MODE,
        )
        .unwrap();
        let geo = Geometry::new(512 << 20, 12).unwrap();
        let mut l = Layout::new(&t).unwrap();
        let end = l.allocate(&geo).unwrap();
        let big = &l.nodes[2];
        let first = geo.data_start(0) + 1 + 4; // after root and lost+found
        assert_eq!(
            big.extents[0],
            Extent {
                logical: 0,
                start: first,
                len: (32768 - first) as u32
            }
        );
        assert_eq!(big.extents[1].start, geo.data_start(1));
        assert_eq!(big.extents.len(), 2);
        assert_eq!(
            end,
            geo.data_start(1) + 40000 - u64::from(big.extents[0].len)
        );
    }

    #[test]
    fn rejects_bad_names_and_targets() {
        let mut t = FileTree::new();
        t.add_file(&"n".repeat(256), Content::bytes(""), FILE_MODE)
            .unwrap();
        assert!(Layout::new(&t).is_err());
        let mut t = FileTree::new();
        t.add_symlink("l", "").unwrap();
        assert!(Layout::new(&t).is_err());
        let mut t = FileTree::new();
        t.add_file("lost+found/x", Content::bytes(""), FILE_MODE)
            .unwrap();
        assert!(Layout::new(&t).is_err());
    }
}
