//! `gmd-wan`: an emulated WAN between two network namespaces; see README.md.
fn main() {}
