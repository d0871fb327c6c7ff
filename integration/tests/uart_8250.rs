// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The UART on a PIO bus, driven the way Linux's 8250 driver probes and uses
//! it, with a real unix-socket client on the other end of the line.
//!
//! Every register access goes through the bus actor and the device actor;
//! interrupts arrive as messages; output bytes are checked where a user would
//! read them: on the socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use switchboard_bus::{BusHandle, RegionId};
use switchboard_devices::models::serial::{spawn_serial, SERIAL_REGION_SIZE};
use switchboard_devices::models::uart::regs::*;
use switchboard_devices::models::uart_sink::Sink;
use switchboard_runtime::{
    AccessReply, AccessSize, ActorId, BusAddr, DeviceId, IrqLevel, IrqLine, IrqNumber, Runtime,
};

const COM1: u64 = 0x3f8;

/// Records every interrupt message.
struct Pic {
    log: Arc<Mutex<Vec<bool>>>,
}

impl Actor for Pic {
    type Context = Context<Self>;
}

impl Handler<IrqLevel> for Pic {
    type Result = ();

    fn handle(&mut self, msg: IrqLevel, _: &mut Context<Self>) {
        assert_eq!(msg.line, IrqNumber(4));
        self.log.lock().expect("irq log").push(msg.high);
    }
}

struct Port {
    bus: BusHandle,
    me: ActorId,
}

impl Port {
    async fn inb(&self, reg: u8) -> u8 {
        match self
            .bus
            .read(&self.me, BusAddr(COM1 + u64::from(reg)), AccessSize::B1)
            .await
        {
            Ok(AccessReply::Read { value }) => value as u8,
            other => panic!("inb {reg}: {other:?}"),
        }
    }

    async fn outb(&self, reg: u8, value: u8) {
        let r = self
            .bus
            .write(
                &self.me,
                BusAddr(COM1 + u64::from(reg)),
                AccessSize::B1,
                u64::from(value),
            )
            .await;
        assert_eq!(r, Ok(AccessReply::Written), "outb {reg}");
    }
}

/// Waits (on the actor system's clock) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        actix_rt::time::sleep(Duration::from_millis(1)).await;
    }
}

#[actix_rt::test]
async fn test_linux_8250_probe_and_use_over_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("com1.sock");
    let rt = Runtime::new();
    let irq_log = Arc::new(Mutex::new(Vec::new()));
    let pic = Pic {
        log: Arc::clone(&irq_log),
    }
    .start();
    let bus = BusHandle::start(&rt, "pio", &Arbiter::current());
    let serial = spawn_serial(
        &rt,
        DeviceId::new("com1"),
        &Sink::UnixSocket(path.clone()),
        IrqLine::new(IrqNumber(4), pic.recipient()),
        &Arbiter::current(),
        None,
    )
    .expect("spawn serial");
    serial.device.realize_and_start().await.expect("start");
    bus.add_device(
        RegionId(1),
        &serial.device,
        Default::default(),
        BusAddr(COM1),
        SERIAL_REGION_SIZE,
    )
    .await
    .expect("plug");
    let mut client = UnixStream::connect(&path).expect("connect to the serial socket");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let port = Port {
        bus: bus.clone(),
        me: ActorId::new("vcpu0"),
    };

    // autoconfig(): IER read-back test.
    let saved_ier = port.inb(IER).await;
    port.outb(IER, 0).await;
    assert_eq!(port.inb(IER).await & 0x0f, 0);
    port.outb(IER, 0x0f).await;
    assert_eq!(port.inb(IER).await & 0x0f, 0x0f);
    port.outb(IER, saved_ier).await;

    // The loopback test: MSR mirrors MCR.
    let saved_mcr = port.inb(MCR).await;
    port.outb(MCR, MCR_LOOP | 0x0a).await;
    assert_eq!(port.inb(MSR).await & 0xf0, 0x90);
    port.outb(MCR, saved_mcr).await;

    // FIFO detection: a 16550A reports both FIFO bits.
    port.outb(FCR, FCR_FIFO_ENABLE).await;
    assert_eq!(port.inb(IIR).await >> 6, 3, "not detected as a 16550A");
    port.outb(FCR, FCR_FIFO_ENABLE | FCR_CLEAR_RX | FCR_CLEAR_TX)
        .await;

    // Scratch register.
    for v in [0xa5, 0x5a] {
        port.outb(SCR, v).await;
        assert_eq!(port.inb(SCR).await, v);
    }

    // Divisor latch for 115200 8N1.
    port.outb(LCR, LCR_DLAB).await;
    port.outb(DLL, 0x01).await;
    port.outb(DLM, 0x00).await;
    assert_eq!(port.inb(DLL).await, 0x01);
    assert_eq!(port.inb(DLM).await, 0x00);
    port.outb(LCR, 0x03).await;
    assert_eq!(port.inb(LCR).await, 0x03);

    // serial8250_startup(): OUT2 gates the interrupt; THRE fires at once.
    assert!(
        irq_log.lock().expect("irq").is_empty(),
        "interrupt before OUT2"
    );
    port.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2).await;
    port.outb(IER, IER_ERBFI | IER_ETBEI).await;
    until("irq high", || *irq_log.lock().expect("irq") == [true]).await;
    assert_eq!(port.inb(IIR).await, IIR_FIFO_ENABLED | IIR_THR_EMPTY);
    // Reading IIR acknowledged THRE; with nothing else pending the line drops.
    until("irq low", || *irq_log.lock().expect("irq") == [true, false]).await;
    assert_eq!(port.inb(IIR).await & IIR_NO_INTERRUPT, IIR_NO_INTERRUPT);
    port.outb(IER, IER_ERBFI).await;

    // Transmit, polling LSR.THRE before every byte as the console driver does.
    let text = b"Linux version 6.1 (switchboard 8250 test)\r\n";
    for &b in text {
        until_thre(&port).await;
        port.outb(THR, b).await;
    }
    let mut got = vec![0u8; text.len()];
    client
        .read_exact(&mut got)
        .expect("read the output from the socket");
    assert_eq!(&got[..], &text[..]);

    // Receive: bytes from the socket raise RDA; the driver drains RBR while DR.
    client.write_all(b"root\n").expect("type into the console");
    until("rx interrupt", || {
        irq_log.lock().expect("irq").last() == Some(&true)
    })
    .await;
    let iir = port.inb(IIR).await;
    assert!(
        iir == IIR_FIFO_ENABLED | IIR_RX_DATA || iir == IIR_FIFO_ENABLED | IIR_RX_TIMEOUT,
        "IIR {iir:#x} does not report received data"
    );
    let mut received = Vec::new();
    let start = Instant::now();
    while received.len() < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "input lost: got {received:?}"
        );
        if port.inb(LSR).await & LSR_DR != 0 {
            received.push(port.inb(RBR).await);
        } else {
            actix_rt::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(received, b"root\n");
    assert_eq!(port.inb(LSR).await & (LSR_DR | LSR_OE), 0);
    until("irq low after draining", || {
        irq_log.lock().expect("irq").last() == Some(&false)
    })
    .await;

    // Unplug: the port disappears from the bus, and the socket is removed.
    bus.unplug(&serial.device, &[RegionId(1)], Some(Duration::from_secs(5)))
        .await
        .expect("unplug");
    assert_eq!(
        port.inb(LSR).await,
        0xff,
        "unplugged port must read all-ones"
    );
    until("socket removed", || !path.exists()).await;
}

async fn until_thre(port: &Port) {
    for _ in 0..1000 {
        if port.inb(LSR).await & LSR_THRE != 0 {
            return;
        }
    }
    panic!("THRE never set");
}
