//! gmdd.
fn main() {}
