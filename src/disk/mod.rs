//! Disk image writers: the GPT container and the two filesystems inside it.

pub mod esp;
pub mod gpt;
pub mod rootfs;
