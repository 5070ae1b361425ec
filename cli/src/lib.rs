//! The `onestop` command: run the whole federation on one machine (`up`), run one service from
//! a configuration file (`serve`), and manage a development PKI (`pki`). The binary in
//! `main.rs` only parses arguments and calls into [`federation`] and [`pki`].

pub mod federation;
pub mod pki;
