//! netprobe placeholder
