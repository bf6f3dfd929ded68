//! FAT32 EFI System Partition writer (and reader helpers for `inspect`).
