//! The `onestop` command: run the whole federation on one machine (`up`), run one service from
//! a configuration file (`serve`), and manage a development PKI (`pki`). The binary in
//! `main.rs` only parses arguments and calls into [`federation`], [`services`] and [`pki`].
//! [`services`] is where every platform service is registered.

pub mod federation;
pub mod pki;
pub mod services;
