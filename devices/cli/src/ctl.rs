// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `switchboard ctl`: one command to the control socket of a
//! `switchboard run`, its reply printed.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Args;
use switchboard_devices::host::control::{BusAccessRequest, Client};

/// `switchboard ctl SOCKET COMMAND [ARGUMENTS]`.
#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    /// The control socket.
    socket: PathBuf,
    /// The command (QMP-style name).
    command: String,
    /// The command's arguments: a JSON object, or for bus-read and
    /// bus-write their words (BUS ADDR SIZE, and VALUE for bus-write).
    arguments: Vec<String>,
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
        let words = &args.arguments;
        let command = &args.command;
        let arguments = match (
            words.as_slice(),
            BusAccessRequest::shorthand(command, words),
        ) {
            ([a], _) if a.trim_start().starts_with('{') => {
                let v: serde_json::Value = serde_json::from_str(a)
                    .with_context(|| format!("ARGUMENTS {a:?} is not JSON"))?;
                if !v.is_object() {
                    bail!("ARGUMENTS must be a JSON object, like '{{\"id\": \"disk0\"}}'");
                }
                Some(v)
            }
            (_, Some(shorthand)) => Some(shorthand.map_err(anyhow::Error::msg)?),
            ([], None) => None,
            ([a], None) => {
                bail!("ARGUMENTS {a:?} is not a JSON object, like '{{\"id\": \"disk0\"}}'")
            }
            (_, None) => bail!(
                "{command} takes one ARGUMENTS JSON object, not {} words",
                words.len()
            ),
        };
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
        .execute(&command, arguments.clone())
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
    let bus_read = (command == "bus-read")
        .then(|| ret["value"].as_u64())
        .flatten();
    if let Some(value) = bus_read {
        // As wide as the access: two hex digits a byte.
        let size = arguments
            .as_ref()
            .and_then(|a| BusAccessRequest::parse(&command, a.as_object()?).ok())
            .map_or(8, |r| r.size.bytes() as usize);
        println!("{value:#0width$x}", width = 2 + 2 * size);
        return Ok(());
    }
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
