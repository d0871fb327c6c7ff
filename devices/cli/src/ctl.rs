// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard ctl`: one command to the control socket of a
//! `switchboard run`, its reply printed.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Args;
use switchboard_devices::host::control::Client;

/// `switchboard ctl SOCKET COMMAND [ARGUMENTS]`.
#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    /// The control socket.
    socket: PathBuf,
    /// The command (QMP-style name).
    command: String,
    /// The command's arguments: a JSON object.
    arguments: Option<String>,
    /// Print the reply line as JSON, unformatted.
    #[arg(long)]
    json: bool,
}

/// A command to send, its arguments parsed.
#[derive(Debug)]
pub(crate) struct CtlRequest {
    socket: PathBuf,
    command: String,
    arguments: Option<serde_json::Value>,
    json: bool,
}

impl TryFrom<CtlArgs> for CtlRequest {
    type Error = anyhow::Error;

    fn try_from(args: CtlArgs) -> anyhow::Result<Self> {
        let arguments = args
            .arguments
            .map(|a| {
                let v: serde_json::Value = serde_json::from_str(&a)
                    .with_context(|| format!("ARGUMENTS {a:?} is not JSON"))?;
                if !v.is_object() {
                    bail!("ARGUMENTS must be a JSON object, like '{{\"id\": \"disk0\"}}'");
                }
                Ok(v)
            })
            .transpose()?;
        Ok(CtlRequest {
            socket: args.socket,
            command: args.command,
            arguments,
            json: args.json,
        })
    }
}

/// Runs `switchboard ctl`: an error reply fails (exit 1).
pub(crate) fn ctl(request: CtlRequest) -> anyhow::Result<()> {
    let CtlRequest {
        socket,
        command,
        arguments,
        json,
    } = request;
    let mut client = Client::connect(&socket)
        .with_context(|| format!("connect to the control socket {}", socket.display()))?;
    let reply = client
        .execute(&command, arguments)
        .with_context(|| format!("{command} on {}", socket.display()))?;
    if json {
        println!("{reply}");
    }
    if let Some(e) = reply.get("error") {
        bail!(
            "{}: {}",
            e["class"].as_str().unwrap_or("Error"),
            e["desc"].as_str().unwrap_or("")
        );
    }
    if json {
        return Ok(());
    }
    let ret = &reply["return"];
    match (command.as_str(), ret.as_array()) {
        ("query-devices", Some(devices)) => {
            println!(
                "{:<16} {:<12} {:<12} {:>9} {:>10}  AT",
                "ID", "KIND", "STATE", "IN-FLIGHT", "HANDLED"
            );
            for d in devices {
                println!(
                    "{:<16} {:<12} {:<12} {:>9} {:>10}  {}",
                    d["id"].as_str().unwrap_or("?"),
                    d["kind"].as_str().unwrap_or("?"),
                    d["state"].as_str().unwrap_or("?"),
                    d["in_flight"].as_u64().unwrap_or(0),
                    d["handled"].as_u64().unwrap_or(0),
                    d["at"].as_str().unwrap_or("")
                );
            }
        }
        _ => println!(
            "{}",
            serde_json::to_string_pretty(ret).unwrap_or_else(|_| ret.to_string())
        ),
    }
    Ok(())
}
