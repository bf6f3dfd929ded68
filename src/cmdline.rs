//! cmdline
