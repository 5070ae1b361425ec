//! The `onestop` command: run the whole federation on one machine (`up`), run one service from
//! a configuration file (`serve`), manage a development PKI (`pki`), and call the platform as a
//! member system (`submit`, `inbox`, `status`, `stats`) or an e-address user (`mailbox`,
//! `message`, `evidence`), and log a person in at the development providers (`login`, `logout`; the session kept by
//! [`session`]). The binary in `main.rs` only parses arguments and calls into [`federation`],
//! [`services`], [`pki`], [`client`], [`mail`], [`devlogin`] and [`session`].
//! [`services`] is where every platform service is registered.

pub mod client;
pub mod devlogin;
pub mod federation;
pub mod mail;
pub mod pki;
pub mod services;
pub mod session;
