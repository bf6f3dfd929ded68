//! Initramfs: newc cpio, reading the Talos initramfs, building our own.
