//! The administration API's messages, client and server (generated from
//! `proto/pbx/admin/v1/admin.proto`), shared by `pbxd` (server) and `pbxctl` (client).
#![allow(clippy::all, missing_docs, unreachable_pub)]

tonic::include_proto!("pbx.admin.v1");
