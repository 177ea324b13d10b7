//! Harness for end-to-end tests: runs gmdd processes and real clients.
