//! ISO9660 + Rock Ridge reader for Talos ISOs.
