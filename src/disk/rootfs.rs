//! ext4 root filesystem writer.
