// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Register model of a 16550A UART, with no threads and no I/O.
//!
//! [`Uart16550`] implements the eight byte-wide registers of the chip as the
//! PC16550D datasheet describes them, closely enough for Linux's 8250 driver to
//! probe it as a 16550A and use it. The model never blocks and never touches a
//! file: the device actor that owns it feeds it register accesses and input
//! bytes, collects transmitted bytes with [`Uart16550::take_output`], and turns
//! [`Uart16550::take_irq_change`] into raise/lower messages for its interrupt
//! line. Moving the bytes to a terminal, file or socket is the job of
//! [`crate::models::uart_sink`].
//!
//! # Simplifications
//!
//! - Transmission is instant: a byte written to THR reaches the output (or, in
//!   loop mode, the receiver) during the write, so THRE and TEMT always read 1
//!   and the transmit FIFO is always empty.
//! - The character timeout fires at once: when the receive FIFO holds data
//!   below its trigger level, IIR reports the timeout interrupt (`0x0C`)
//!   immediately instead of after four character times. Drivers treat both
//!   receive interrupts alike, so only the latency differs.
//! - On overrun the newest byte is dropped, in FIFO mode (as the datasheet
//!   says) and also in non-FIFO mode (where the chip would overwrite the
//!   holding register instead). No driver depends on which byte survives.
//! - There is no framing: word length, stop bits, parity and break in LCR are
//!   stored and read back but do not change the bytes, so PE, FE, BI and the
//!   LSR FIFO-error bit never set.
//! - The modem inputs outside loop mode are fixed as a connected line
//!   (DCD, DSR and CTS asserted, RI clear).
//! - DMA mode (FCR bit 3) and the 64-byte FIFO bit of later chips are ignored.

use std::collections::VecDeque;

pub mod regs {
    //! Register offsets and bit masks of the 16550A, named as in the PC16550D
    //! datasheet ("Table II. Summary of Registers").

    /// Receiver buffer register (read, DLAB=0).
    pub const RBR: u8 = 0;
    /// Transmitter holding register (write, DLAB=0).
    pub const THR: u8 = 0;
    /// Divisor latch, low byte (read/write, DLAB=1).
    pub const DLL: u8 = 0;
    /// Interrupt enable register (DLAB=0).
    pub const IER: u8 = 1;
    /// Divisor latch, high byte (read/write, DLAB=1).
    pub const DLM: u8 = 1;
    /// Interrupt identification register (read).
    pub const IIR: u8 = 2;
    /// FIFO control register (write).
    pub const FCR: u8 = 2;
    /// Line control register.
    pub const LCR: u8 = 3;
    /// Modem control register.
    pub const MCR: u8 = 4;
    /// Line status register.
    pub const LSR: u8 = 5;
    /// Modem status register.
    pub const MSR: u8 = 6;
    /// Scratch register.
    pub const SCR: u8 = 7;
    /// Number of register offsets the chip decodes (0..8).
    pub const REGISTER_COUNT: u8 = 8;

    /// IER: enable received data available (and character timeout) interrupt.
    pub const IER_ERBFI: u8 = 0x01;
    /// IER: enable transmitter holding register empty interrupt.
    pub const IER_ETBEI: u8 = 0x02;
    /// IER: enable receiver line status interrupt.
    pub const IER_ELSI: u8 = 0x04;
    /// IER: enable modem status interrupt.
    pub const IER_EDSSI: u8 = 0x08;

    /// IIR bit 0: set when no interrupt is pending.
    pub const IIR_NO_INTERRUPT: u8 = 0x01;
    /// IIR id: modem status changed (lowest priority).
    pub const IIR_MODEM_STATUS: u8 = 0x00;
    /// IIR id: transmitter holding register empty.
    pub const IIR_THR_EMPTY: u8 = 0x02;
    /// IIR id: received data available (at or above the trigger level).
    pub const IIR_RX_DATA: u8 = 0x04;
    /// IIR id: receiver line status (overrun, parity, framing, break).
    pub const IIR_RX_LINE_STATUS: u8 = 0x06;
    /// IIR id: character timeout (data below the trigger level).
    pub const IIR_RX_TIMEOUT: u8 = 0x0C;
    /// IIR bits 6-7: both set while the FIFOs are enabled.
    pub const IIR_FIFO_ENABLED: u8 = 0xC0;

    /// FCR: enable both FIFOs; the other FCR bits are only written with it.
    pub const FCR_FIFO_ENABLE: u8 = 0x01;
    /// FCR: clear the receive FIFO (self-clearing).
    pub const FCR_CLEAR_RX: u8 = 0x02;
    /// FCR: clear the transmit FIFO (self-clearing).
    pub const FCR_CLEAR_TX: u8 = 0x04;
    /// FCR bits 6-7: receive trigger level, 1, 4, 8 or 14 bytes.
    pub const FCR_RX_TRIGGER_MASK: u8 = 0xC0;

    /// LCR: divisor latch access bit.
    pub const LCR_DLAB: u8 = 0x80;

    /// MCR: data terminal ready.
    pub const MCR_DTR: u8 = 0x01;
    /// MCR: request to send.
    pub const MCR_RTS: u8 = 0x02;
    /// MCR: user output 1.
    pub const MCR_OUT1: u8 = 0x04;
    /// MCR: user output 2, which gates the IRQ line on PC hardware.
    pub const MCR_OUT2: u8 = 0x08;
    /// MCR: local loopback (diagnostic) mode.
    pub const MCR_LOOP: u8 = 0x10;

    /// LSR: receiver data ready.
    pub const LSR_DR: u8 = 0x01;
    /// LSR: overrun error.
    pub const LSR_OE: u8 = 0x02;
    /// LSR: parity error.
    pub const LSR_PE: u8 = 0x04;
    /// LSR: framing error.
    pub const LSR_FE: u8 = 0x08;
    /// LSR: break interrupt.
    pub const LSR_BI: u8 = 0x10;
    /// LSR: transmitter holding register (or transmit FIFO) empty.
    pub const LSR_THRE: u8 = 0x20;
    /// LSR: transmitter empty (holding and shift register).
    pub const LSR_TEMT: u8 = 0x40;
    /// LSR: at least one parity, framing or break error in the receive FIFO.
    pub const LSR_FIFO_ERROR: u8 = 0x80;

    /// MSR: delta clear to send.
    pub const MSR_DCTS: u8 = 0x01;
    /// MSR: delta data set ready.
    pub const MSR_DDSR: u8 = 0x02;
    /// MSR: trailing edge ring indicator.
    pub const MSR_TERI: u8 = 0x04;
    /// MSR: delta data carrier detect.
    pub const MSR_DDCD: u8 = 0x08;
    /// MSR: clear to send.
    pub const MSR_CTS: u8 = 0x10;
    /// MSR: data set ready.
    pub const MSR_DSR: u8 = 0x20;
    /// MSR: ring indicator.
    pub const MSR_RI: u8 = 0x40;
    /// MSR: data carrier detect.
    pub const MSR_DCD: u8 = 0x80;
}

use regs::*;

/// Depth of the receive and transmit FIFOs of a 16550A.
pub const FIFO_SIZE: usize = 16;

/// Baud rate at divisor 1: the PC's 1.8432 MHz crystal divided by 16.
pub const BASE_BAUD: u32 = 115_200;

/// Divisor loaded at power-on.
///
/// The datasheet leaves DLL/DLM undefined after reset; 12 (9600 baud) is a
/// conventional, valid value, so a baud query never divides by zero before the
/// driver programs the latch.
pub const POWER_ON_DIVISOR: u16 = 12;

/// What happened to the IRQ line since the previous [`Uart16550::take_irq_change`].
///
/// A wrapper sends an interrupt message only for the variants other than
/// [`IrqChange::Unchanged`], so an idle line costs nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqChange {
    /// The line is where it was at the previous call.
    Unchanged,
    /// The line went from low to high.
    Raised,
    /// The line went from high to low.
    Lowered,
    /// The line was high, dropped, and is high again. An edge-triggered
    /// interrupt controller (the PC's ISA PIC) needs the lower-then-raise
    /// pair to see a new interrupt; a level-triggered one may ignore it.
    Retriggered,
}

/// Edge bookkeeping for the IRQ output, kept apart from the chip registers.
#[derive(Debug, Clone, Copy, Default)]
struct IrqTracker {
    /// Current level of the line.
    level: bool,
    /// Level as of the last `take`, i.e. what the wrapper last announced.
    reported: bool,
    /// The line fell at least once since the last `take`; needed to tell
    /// "stayed high" from "dropped and came back" (see `IrqChange::Retriggered`).
    fell: bool,
}

impl IrqTracker {
    fn set(&mut self, level: bool) {
        if self.level && !level {
            self.fell = true;
        }
        self.level = level;
    }

    fn take(&mut self) -> IrqChange {
        let change = match (self.reported, self.level) {
            (false, true) => IrqChange::Raised,
            (true, false) => IrqChange::Lowered,
            (true, true) if self.fell => IrqChange::Retriggered,
            // A rise and fall between two calls leaves nothing to announce:
            // no single register access can produce one (see `write_thr`).
            _ => IrqChange::Unchanged,
        };
        self.reported = self.level;
        self.fell = false;
        change
    }
}

/// A 16550A UART register file with its receive FIFO and interrupt logic.
///
/// All state changes happen inside [`read`](Self::read),
/// [`write`](Self::write), [`receive`](Self::receive) and
/// [`reset`](Self::reset); after each of them the caller collects transmitted
/// bytes with [`take_output`](Self::take_output) and interrupt line changes
/// with [`take_irq_change`](Self::take_irq_change).
///
/// ```
/// use switchboard_devices::models::uart::{regs, IrqChange, Uart16550};
///
/// let mut uart = Uart16550::new();
/// uart.write(regs::FCR, regs::FCR_FIFO_ENABLE);
/// uart.write(regs::MCR, regs::MCR_OUT2);
/// uart.write(regs::IER, regs::IER_ERBFI);
/// assert_eq!(uart.receive(b"hi"), 2);
/// assert_eq!(uart.take_irq_change(), IrqChange::Raised);
/// assert_eq!(uart.read(regs::RBR), b'h');
/// assert_eq!(uart.read(regs::RBR), b'i');
/// assert_eq!(uart.take_irq_change(), IrqChange::Lowered);
///
/// uart.write(regs::THR, b'!');
/// assert_eq!(uart.take_output(), b"!");
/// ```
#[derive(Debug, Clone)]
pub struct Uart16550 {
    /// Receive FIFO (or the single holding register when FIFOs are off).
    rx: VecDeque<u8>,
    /// Transmitted bytes not yet collected by `take_output`.
    output: Vec<u8>,
    /// Interrupt enable register, low nibble only.
    ier: u8,
    lcr: u8,
    /// Modem control register, low five bits only.
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    /// Receive trigger level programmed through FCR; only used with FIFOs on.
    rx_trigger: usize,
    /// Sticky LSR error bits (OE, PE, FE, BI), cleared by reading LSR.
    line_errors: u8,
    /// THRE interrupt source latch. Separate from the LSR THRE bit (always 1
    /// here) because reading IIR clears the interrupt but not the status.
    thre_pending: bool,
    /// MSR delta bits (low nibble), cleared by reading MSR.
    msr_delta: u8,
    irq: IrqTracker,
}

impl Default for Uart16550 {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart16550 {
    /// Creates a UART in its power-on reset state: no interrupts enabled,
    /// FIFOs off, IIR `0x01`, LSR `0x60`, MSR `0xB0`, IRQ low.
    pub fn new() -> Self {
        let [dll, dlm] = POWER_ON_DIVISOR.to_le_bytes();
        Self {
            rx: VecDeque::with_capacity(FIFO_SIZE),
            output: Vec::new(),
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            dll,
            dlm,
            fifo_enabled: false,
            rx_trigger: 1,
            line_errors: 0,
            thre_pending: false,
            msr_delta: 0,
            irq: IrqTracker::default(),
        }
    }

    /// Applies a master reset, as the chip's MR pin does.
    ///
    /// Registers return to their power-on values and the receive FIFO is
    /// emptied. Bytes already transmitted stay available to
    /// [`take_output`](Self::take_output), and a high IRQ line is reported as
    /// [`IrqChange::Lowered`] by the next [`take_irq_change`](Self::take_irq_change).
    pub fn reset(&mut self) {
        let output = std::mem::take(&mut self.output);
        let irq = self.irq;
        *self = Self::new();
        self.output = output;
        self.irq = irq;
        self.update_irq();
    }

    /// Reads the register at `offset` (0..=7), with the side effects of a
    /// CPU read: RBR pops a byte, IIR acknowledges a THRE interrupt, LSR
    /// clears the error bits, MSR clears the delta bits.
    ///
    /// Reading RBR with an empty receiver returns 0. Offsets past 7 are not
    /// decoded by the chip and read `0xFF`, as an undriven ISA bus does.
    pub fn read(&mut self, offset: u8) -> u8 {
        let value = match offset {
            RBR if self.dlab() => self.dll,
            RBR => self.rx.pop_front().unwrap_or(0),
            IER if self.dlab() => self.dlm,
            IER => self.ier,
            IIR => self.read_iir(),
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => self.read_lsr(),
            MSR => self.read_msr(),
            SCR => self.scr,
            _ => 0xFF,
        };
        self.update_irq();
        value
    }

    /// Writes `value` to the register at `offset` (0..=7).
    ///
    /// Writes to LSR and MSR are ignored (the datasheet reserves them for
    /// factory test), and so are offsets past 7.
    pub fn write(&mut self, offset: u8, value: u8) {
        match offset {
            THR if self.dlab() => self.dll = value,
            THR => self.write_thr(value),
            IER if self.dlab() => self.dlm = value,
            IER => self.write_ier(value),
            FCR => self.write_fcr(value),
            LCR => self.lcr = value,
            MCR => self.write_mcr(value),
            SCR => self.scr = value,
            _ => {}
        }
        self.update_irq();
    }

    /// Delivers bytes arriving on the serial input.
    ///
    /// Returns how many bytes were stored, always a prefix of `bytes`: at most
    /// [`rx_space`](Self::rx_space) of them. If some did not fit, they are
    /// dropped and LSR.OE is set, as when a character arrives at a full FIFO;
    /// the bytes already stored are kept. In loop mode the serial input is
    /// disconnected from the receiver, so nothing is stored, nothing is
    /// flagged, and 0 is returned: a pump that honours `rx_space` simply waits.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        if self.loopback() {
            return 0;
        }
        let mut stored = 0;
        for &byte in bytes {
            if !self.push_rx(byte) {
                break;
            }
            stored += 1;
        }
        self.update_irq();
        stored
    }

    /// Appends the bytes transmitted since the previous call to `dst`, oldest
    /// first, without allocating once `dst` has grown: the form for a
    /// wrapper that collects output after every register access.
    pub fn drain_output_into(&mut self, dst: &mut Vec<u8>) {
        dst.append(&mut self.output);
    }

    /// Free room in the receiver: how many bytes [`receive`](Self::receive)
    /// would accept now without an overrun. 0 in loop mode, where external
    /// input is not accepted at all.
    pub fn rx_space(&self) -> usize {
        if self.loopback() {
            0
        } else {
            self.rx_capacity() - self.rx.len()
        }
    }

    /// Takes the bytes transmitted since the previous call, oldest first.
    ///
    /// The buffer is unbounded, so the owner is expected to call this (or
    /// [`drain_output_into`](Self::drain_output_into)) after every THR write.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Current level of the IRQ line: an interrupt is pending and the OUT2
    /// pin enables the PC's interrupt buffer.
    ///
    /// In loop mode the datasheet forces the modem control outputs inactive,
    /// OUT2 included, so the line stays low even though IIR still reports
    /// the pending source.
    pub fn irq_level(&self) -> bool {
        self.irq.level
    }

    /// Reports how the IRQ line moved since the previous call (initially:
    /// since power-on, with the line low) and starts a new interval.
    ///
    /// Call it after every `read`, `write`, `receive` or `reset` to turn level
    /// changes into interrupt messages only on edges.
    pub fn take_irq_change(&mut self) -> IrqChange {
        self.irq.take()
    }

    /// Whether the chip's own INTR output is active, regardless of OUT2
    /// gating; IIR bit 0 reads as the complement.
    pub fn interrupt_pending(&self) -> bool {
        self.pending_interrupt().is_some()
    }

    /// The baud rate divisor in DLM:DLL.
    pub fn baud_divisor(&self) -> u16 {
        u16::from_le_bytes([self.dll, self.dlm])
    }

    /// The baud rate the divisor selects with the PC's 1.8432 MHz clock, or
    /// `None` for divisor 0, which the datasheet leaves undefined.
    pub fn baud_rate(&self) -> Option<u32> {
        BASE_BAUD.checked_div(u32::from(self.baud_divisor()))
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled {
            FIFO_SIZE
        } else {
            1
        }
    }

    fn rx_trigger_level(&self) -> usize {
        if self.fifo_enabled {
            self.rx_trigger
        } else {
            1
        }
    }

    /// Stores one received byte, or flags an overrun and drops it.
    fn push_rx(&mut self, byte: u8) -> bool {
        if self.rx.len() < self.rx_capacity() {
            self.rx.push_back(byte);
            true
        } else {
            self.line_errors |= LSR_OE;
            false
        }
    }

    /// The highest-priority pending interrupt id, per the datasheet's
    /// "Interrupt Control Functions" table.
    fn pending_interrupt(&self) -> Option<u8> {
        if self.ier & IER_ELSI != 0 && self.line_errors != 0 {
            return Some(IIR_RX_LINE_STATUS);
        }
        if self.ier & IER_ERBFI != 0 && !self.rx.is_empty() {
            // Below the trigger level the real chip waits four character
            // times before the timeout interrupt; we raise it immediately.
            return Some(if self.rx.len() >= self.rx_trigger_level() {
                IIR_RX_DATA
            } else {
                IIR_RX_TIMEOUT
            });
        }
        if self.ier & IER_ETBEI != 0 && self.thre_pending {
            return Some(IIR_THR_EMPTY);
        }
        if self.ier & IER_EDSSI != 0 && self.msr_delta != 0 {
            return Some(IIR_MODEM_STATUS);
        }
        None
    }

    fn update_irq(&mut self) {
        let gate = self.mcr & MCR_OUT2 != 0 && !self.loopback();
        let level = gate && self.interrupt_pending();
        self.irq.set(level);
    }

    fn read_iir(&mut self) -> u8 {
        let id = self.pending_interrupt();
        // The datasheet acknowledges THRE by an IIR read that reports it;
        // lower-priority sources hidden behind another id stay pending.
        if id == Some(IIR_THR_EMPTY) {
            self.thre_pending = false;
        }
        let fifo_bits = if self.fifo_enabled {
            IIR_FIFO_ENABLED
        } else {
            0
        };
        id.unwrap_or(IIR_NO_INTERRUPT) | fifo_bits
    }

    fn read_lsr(&mut self) -> u8 {
        let ready = if self.rx.is_empty() { 0 } else { LSR_DR };
        let value = ready | LSR_THRE | LSR_TEMT | self.line_errors;
        self.line_errors = 0;
        value
    }

    fn read_msr(&mut self) -> u8 {
        let value = self.modem_inputs() | self.msr_delta;
        self.msr_delta = 0;
        value
    }

    fn write_thr(&mut self, value: u8) {
        // Loading THR acknowledges THRE. Record the drop before the instant
        // transmission re-arms it, so a line that was held high by THRE
        // alone is reported as retriggered: an edge-triggered PIC must see a
        // new edge for the next "transmitter empty" interrupt.
        self.thre_pending = false;
        self.update_irq();
        if self.loopback() {
            self.push_rx(value);
        } else {
            self.output.push(value);
        }
        self.thre_pending = true;
    }

    fn write_ier(&mut self, value: u8) {
        let value = value & 0x0F;
        // THR is always empty, so enabling ETBEI raises THRE at once; Linux
        // starts transmission this way and checks for it at startup.
        if value & IER_ETBEI != 0 && self.ier & IER_ETBEI == 0 {
            self.thre_pending = true;
        }
        self.ier = value;
    }

    fn write_fcr(&mut self, value: u8) {
        let enable = value & FCR_FIFO_ENABLE != 0;
        // Switching FIFO mode either way empties the receiver.
        if enable != self.fifo_enabled {
            self.rx.clear();
            self.fifo_enabled = enable;
        }
        // The other FCR bits are only programmed together with bit 0.
        if !enable {
            return;
        }
        if value & FCR_CLEAR_RX != 0 {
            self.rx.clear();
        }
        // FCR_CLEAR_TX has nothing to do: the transmit FIFO is always empty.
        self.rx_trigger = match (value & FCR_RX_TRIGGER_MASK) >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        };
    }

    fn write_mcr(&mut self, value: u8) {
        let before = self.modem_inputs();
        self.mcr = value & 0x1F;
        let after = self.modem_inputs();
        let changed = before ^ after;
        if changed & MSR_CTS != 0 {
            self.msr_delta |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            self.msr_delta |= MSR_DDSR;
        }
        if changed & MSR_DCD != 0 {
            self.msr_delta |= MSR_DDCD;
        }
        // RI reports only its trailing edge.
        if before & MSR_RI != 0 && after & MSR_RI == 0 {
            self.msr_delta |= MSR_TERI;
        }
    }

    /// Upper nibble of MSR: the modem input lines.
    fn modem_inputs(&self) -> u8 {
        if !self.loopback() {
            return MSR_DCD | MSR_DSR | MSR_CTS;
        }
        // In loop mode the outputs are wired back to the inputs inside the
        // chip (datasheet "MCR bit 4").
        let mut inputs = 0;
        if self.mcr & MCR_RTS != 0 {
            inputs |= MSR_CTS;
        }
        if self.mcr & MCR_DTR != 0 {
            inputs |= MSR_DSR;
        }
        if self.mcr & MCR_OUT1 != 0 {
            inputs |= MSR_RI;
        }
        if self.mcr & MCR_OUT2 != 0 {
            inputs |= MSR_DCD;
        }
        inputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a string the way Linux's polled console does: wait for THRE
    /// before each byte.
    fn write_polled(uart: &mut Uart16550, text: &[u8]) {
        for &byte in text {
            let mut polls = 0;
            while uart.read(LSR) & LSR_THRE == 0 {
                polls += 1;
                assert!(polls < 1000, "THRE never set");
            }
            uart.write(THR, byte);
        }
    }

    /// A UART set up like Linux after startup: FIFO on (trigger 1), 8N1,
    /// DTR|RTS|OUT2, with the given interrupts enabled and the initial
    /// interrupt state acknowledged.
    fn configured(ier: u8) -> Uart16550 {
        let mut uart = Uart16550::new();
        uart.write(FCR, FCR_FIFO_ENABLE);
        uart.write(LCR, 0x03);
        uart.write(MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        uart.write(IER, ier);
        uart.read(IIR);
        uart.take_irq_change();
        uart
    }

    #[test]
    fn test_power_on_state() {
        let mut uart = Uart16550::new();
        assert_eq!(uart.read(IER), 0);
        assert_eq!(uart.read(IIR), IIR_NO_INTERRUPT);
        assert_eq!(uart.read(LCR), 0);
        assert_eq!(uart.read(MCR), 0);
        assert_eq!(uart.read(LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(uart.read(MSR), MSR_DCD | MSR_DSR | MSR_CTS);
        assert_eq!(uart.baud_divisor(), POWER_ON_DIVISOR);
        assert!(!uart.irq_level());
        assert_eq!(uart.take_irq_change(), IrqChange::Unchanged);
    }

    #[test]
    fn test_linux_8250_probe_and_use() {
        let mut uart = Uart16550::new();

        // autoconfig: IER read-back test.
        let saved_ier = uart.read(IER);
        uart.write(IER, 0);
        assert_eq!(uart.read(IER) & 0x0F, 0);
        uart.write(IER, 0x0F);
        assert_eq!(uart.read(IER) & 0x0F, 0x0F);
        uart.write(IER, saved_ier);

        // Scratch register test.
        uart.write(SCR, 0xA5);
        assert_eq!(uart.read(SCR), 0xA5);
        uart.write(SCR, 0x5A);
        assert_eq!(uart.read(SCR), 0x5A);

        // Loopback test: RTS|OUT2 in loop mode must read back as CTS|DCD.
        let saved_mcr = uart.read(MCR);
        uart.write(MCR, MCR_LOOP | 0x0A);
        assert_eq!(uart.read(MSR) & 0xF0, 0x90);
        uart.write(MCR, saved_mcr);

        // FIFO test: IIR bits 6-7 both set identify a 16550A.
        uart.write(FCR, FCR_FIFO_ENABLE);
        assert_eq!(uart.read(IIR) >> 6, 3);

        // Divisor latch for 115200 baud, then 8N1.
        uart.write(LCR, LCR_DLAB);
        uart.write(DLL, 0x01);
        uart.write(DLM, 0x00);
        assert_eq!(uart.read(DLL), 0x01);
        assert_eq!(uart.read(DLM), 0x00);
        uart.write(LCR, 0x03);
        assert_eq!(uart.baud_divisor(), 1);
        assert_eq!(uart.baud_rate(), Some(115_200));
        assert_eq!(uart.read(LCR), 0x03);

        // startup: drain stale state, then enable the line and interrupts.
        uart.read(LSR);
        uart.read(RBR);
        uart.read(IIR);
        uart.read(MSR);
        assert_eq!(uart.take_irq_change(), IrqChange::Unchanged);
        uart.write(MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        uart.write(IER, IER_ERBFI | IER_ETBEI);
        assert!(uart.irq_level());
        assert_eq!(uart.take_irq_change(), IrqChange::Raised);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_THR_EMPTY);
        assert!(!uart.irq_level());
        assert_eq!(uart.take_irq_change(), IrqChange::Lowered);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_NO_INTERRUPT);

        // Polled transmit.
        write_polled(&mut uart, b"Linux version 6.x\r\n");
        assert_eq!(uart.take_output(), b"Linux version 6.x\r\n");
        assert_eq!(uart.read(LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);

        // Receive at trigger level 1.
        uart.read(IIR);
        uart.take_irq_change();
        assert_eq!(uart.receive(b"ls\n"), 3);
        assert_ne!(uart.read(LSR) & LSR_DR, 0);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_RX_DATA);
        assert_eq!(uart.take_irq_change(), IrqChange::Raised);
        let mut received = Vec::new();
        while uart.read(LSR) & LSR_DR != 0 {
            received.push(uart.read(RBR));
        }
        assert_eq!(received, b"ls\n");
        assert_eq!(uart.read(LSR) & LSR_DR, 0);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_NO_INTERRUPT);
        assert_eq!(uart.take_irq_change(), IrqChange::Lowered);
    }

    #[test]
    fn test_linux_startup_thre_checks_find_no_bugs() {
        let mut uart = configured(0);
        // The driver's first sanity check: a missing port reads LSR 0xFF.
        assert_ne!(uart.read(LSR), 0xFF);

        // Enabling THRI with THR empty must raise THRE every time, also
        // after an IIR read acknowledged the previous one.
        uart.write(IER, IER_ETBEI);
        let first = uart.read(IIR);
        uart.write(IER, 0);
        uart.write(IER, IER_ETBEI);
        let second = uart.read(IIR);
        uart.write(IER, 0);
        assert_eq!(first & IIR_NO_INTERRUPT, 0);
        assert_eq!(second & IIR_NO_INTERRUPT, 0);

        // With TEMT set, enabling THRI must leave an interrupt pending.
        uart.write(IER, IER_ETBEI);
        let lsr = uart.read(LSR);
        let iir = uart.read(IIR);
        uart.write(IER, 0);
        assert_ne!(lsr & LSR_TEMT, 0);
        assert_eq!(iir & 0x0F, IIR_THR_EMPTY);
    }

    #[test]
    fn test_drain_output_into_appends_and_empties() {
        let mut uart = Uart16550::new();
        let mut out = b">".to_vec();
        uart.write(THR, b'a');
        uart.write(THR, b'b');
        uart.drain_output_into(&mut out);
        assert_eq!(out, b">ab");
        assert!(uart.take_output().is_empty());
    }

    #[test]
    fn test_linux_variant_probes_still_find_plain_16550a() {
        // After detecting a 16550A, the 8250 driver looks for later chips by
        // reading offset 2 under special LCR values and toggling bits that a
        // 16550A does not implement. Each must answer "not present".
        let mut uart = Uart16550::new();
        uart.write(FCR, FCR_FIFO_ENABLE);

        // EFR probes (16650 family): offset 2 must not read back as 0.
        uart.write(LCR, 0x80);
        assert_ne!(uart.read(2), 0);
        uart.write(LCR, 0xBF);
        assert_ne!(uart.read(2), 0);

        // National SuperIO probe: bit 4 of offset 2 must not follow MCR.LOOP.
        uart.write(LCR, 0);
        let mcr = uart.read(MCR);
        uart.write(MCR, mcr ^ MCR_LOOP);
        uart.write(LCR, 0xE0);
        let status = uart.read(2);
        uart.write(LCR, 0);
        uart.write(MCR, mcr);
        assert_eq!((status ^ mcr) & MCR_LOOP, 0);

        // 16750 probe: the 64-byte FIFO bit must not show in IIR bit 5.
        uart.write(FCR, FCR_FIFO_ENABLE | 0x20);
        assert_eq!(uart.read(IIR) >> 5, 6);
        uart.write(LCR, 0x80);
        uart.write(FCR, FCR_FIFO_ENABLE | 0x20);
        assert_eq!(uart.read(IIR) >> 5, 6);
        uart.write(LCR, 0);

        // XScale probe: IER bit 6 must not stick.
        uart.write(IER, 0x40);
        assert_eq!(uart.read(IER) & 0x40, 0);
    }

    #[test]
    fn test_overrun_keeps_first_16_bytes() {
        let mut uart = configured(IER_ERBFI | IER_ELSI);
        let input: Vec<u8> = (0..20).collect();
        assert_eq!(uart.receive(&input), FIFO_SIZE);
        assert_eq!(uart.rx_space(), 0);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_RX_LINE_STATUS);

        let lsr = uart.read(LSR);
        assert_eq!(lsr & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
        assert_eq!(uart.read(LSR) & LSR_OE, 0);
        // With the error acknowledged, the data interrupt shows through.
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_RX_DATA);

        let received: Vec<u8> = (0..FIFO_SIZE).map(|_| uart.read(RBR)).collect();
        assert_eq!(received, input[..FIFO_SIZE]);
        assert_eq!(uart.read(LSR) & (LSR_DR | LSR_OE), 0);
    }

    #[test]
    fn test_overrun_sets_oe_once_per_lsr_read() {
        let mut uart = configured(0);
        uart.receive(&[0; FIFO_SIZE]);
        assert_eq!(uart.receive(b"a"), 0);
        assert_eq!(uart.receive(b"b"), 0);
        assert_ne!(uart.read(LSR) & LSR_OE, 0);
        assert_eq!(uart.read(LSR) & LSR_OE, 0);
    }

    #[test]
    fn test_non_fifo_receiver_holds_one_byte() {
        let mut uart = Uart16550::new();
        assert_eq!(uart.rx_space(), 1);
        assert_eq!(uart.receive(b"xy"), 1);
        assert_eq!(uart.read(LSR) & (LSR_DR | LSR_OE), LSR_DR | LSR_OE);
        assert_eq!(uart.read(RBR), b'x');
        assert_eq!(uart.read(LSR) & LSR_DR, 0);
    }

    #[test]
    fn test_loop_mode_returns_thr_to_rbr() {
        let mut uart = configured(0);
        uart.write(MCR, MCR_LOOP);
        uart.write(THR, b'Q');
        assert!(uart.take_output().is_empty());
        assert_ne!(uart.read(LSR) & LSR_DR, 0);
        assert_eq!(uart.read(RBR), b'Q');
    }

    #[test]
    fn test_loop_mode_disconnects_serial_input() {
        let mut uart = configured(0);
        uart.write(MCR, MCR_LOOP);
        assert_eq!(uart.rx_space(), 0);
        assert_eq!(uart.receive(b"ext"), 0);
        assert_eq!(uart.read(LSR) & (LSR_DR | LSR_OE), 0);
        uart.write(MCR, 0);
        assert_eq!(uart.rx_space(), FIFO_SIZE);
    }

    #[test]
    fn test_loop_mode_msr_mirrors_mcr() {
        let mut uart = Uart16550::new();
        uart.write(MCR, MCR_LOOP | MCR_DTR);
        assert_eq!(uart.read(MSR) & 0xF0, MSR_DSR);
        uart.write(MCR, MCR_LOOP | MCR_OUT1);
        assert_eq!(uart.read(MSR) & 0xF0, MSR_RI);
        uart.write(MCR, MCR_LOOP | MCR_RTS | MCR_OUT2);
        assert_eq!(uart.read(MSR) & 0xF0, MSR_CTS | MSR_DCD);
    }

    #[test]
    fn test_msr_delta_bits_latch_and_clear_on_read() {
        let mut uart = Uart16550::new();
        uart.read(MSR);
        // Entering loop mode with all outputs off drops DCD, DSR and CTS.
        uart.write(MCR, MCR_LOOP | MCR_OUT1);
        assert_eq!(uart.read(MSR), MSR_RI | MSR_DCTS | MSR_DDSR | MSR_DDCD);
        assert_eq!(uart.read(MSR), MSR_RI);
        // RI reports only its trailing edge.
        uart.write(MCR, MCR_LOOP);
        assert_eq!(uart.read(MSR), MSR_TERI);
        uart.write(MCR, MCR_LOOP | MCR_OUT1);
        assert_eq!(uart.read(MSR), MSR_RI);
    }

    #[test]
    fn test_modem_status_interrupt_has_lowest_priority() {
        let mut uart = configured(IER_EDSSI | IER_ETBEI);
        uart.write(IER, IER_EDSSI);
        // Leaving and re-entering "connected" via loop mode latches deltas.
        uart.write(MCR, MCR_LOOP | MCR_OUT2);
        uart.write(MCR, MCR_OUT2);
        uart.write(IER, IER_EDSSI | IER_ETBEI);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_THR_EMPTY);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_MODEM_STATUS);
        assert!(uart.irq_level());
        uart.read(MSR);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_NO_INTERRUPT);
        assert!(!uart.irq_level());
    }

    #[test]
    fn test_iir_priority_order() {
        let mut uart = configured(IER_ELSI | IER_ERBFI | IER_ETBEI);
        uart.write(THR, b'x'); // re-arm THRE
        uart.receive(&[0; FIFO_SIZE + 1]);
        assert_eq!(uart.read(IIR) & 0x0F, IIR_RX_LINE_STATUS);
        uart.read(LSR);
        assert_eq!(uart.read(IIR) & 0x0F, IIR_RX_DATA);
        uart.write(FCR, FCR_FIFO_ENABLE | FCR_CLEAR_RX);
        assert_eq!(uart.read(IIR) & 0x0F, IIR_THR_EMPTY);
        assert_eq!(uart.read(IIR) & 0x0F, IIR_NO_INTERRUPT);
    }

    #[test]
    fn test_rx_trigger_level_and_timeout() {
        let mut uart = configured(IER_ERBFI);
        uart.write(FCR, FCR_FIFO_ENABLE | 0x80); // trigger at 8
        uart.receive(&[1; 7]);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_RX_TIMEOUT);
        assert!(uart.irq_level());
        uart.receive(&[1]);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_RX_DATA);
        uart.read(RBR);
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_RX_TIMEOUT);
    }

    #[test]
    fn test_trigger_levels_decode() {
        for (bits, level) in [(0x00, 1), (0x40, 4), (0x80, 8), (0xC0, 14)] {
            let mut uart = configured(IER_ERBFI);
            uart.write(FCR, FCR_FIFO_ENABLE | bits);
            uart.receive(&vec![0; level - 1]);
            if level > 1 {
                assert_eq!(uart.read(IIR) & 0x0F, IIR_RX_TIMEOUT, "level {level}");
            }
            uart.receive(&[0]);
            assert_eq!(uart.read(IIR) & 0x0F, IIR_RX_DATA, "level {level}");
        }
    }

    #[test]
    fn test_fcr_clear_rx_empties_fifo() {
        let mut uart = configured(IER_ERBFI);
        uart.receive(b"abc");
        uart.write(FCR, FCR_FIFO_ENABLE | FCR_CLEAR_RX | FCR_CLEAR_TX);
        assert_eq!(uart.read(LSR) & LSR_DR, 0);
        assert_eq!(uart.rx_space(), FIFO_SIZE);
        assert!(!uart.irq_level());
    }

    #[test]
    fn test_disabling_fifo_clears_rx_and_iir_fifo_bits() {
        let mut uart = configured(0);
        uart.receive(b"abc");
        uart.write(FCR, 0);
        assert_eq!(uart.read(IIR), IIR_NO_INTERRUPT);
        assert_eq!(uart.read(LSR) & LSR_DR, 0);
        assert_eq!(uart.rx_space(), 1);
    }

    #[test]
    fn test_fcr_bits_ignored_without_enable() {
        let mut uart = Uart16550::new();
        uart.receive(b"a");
        // Bit 0 clear: the clear-receiver bit is not programmed either.
        uart.write(FCR, FCR_CLEAR_RX);
        assert_eq!(uart.read(RBR), b'a');
    }

    #[test]
    fn test_enabling_etbei_raises_thre() {
        let mut uart = configured(0);
        uart.write(IER, IER_ETBEI);
        assert!(uart.irq_level());
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_THR_EMPTY);
        // Rewriting the same IER is not an enable and raises nothing.
        uart.write(IER, IER_ETBEI);
        assert!(!uart.irq_level());
        assert_eq!(uart.read(IIR), IIR_FIFO_ENABLED | IIR_NO_INTERRUPT);
    }

    #[test]
    fn test_thr_write_rearms_thre() {
        let mut uart = configured(IER_ETBEI);
        assert_eq!(uart.read(IIR) & 0x0F, IIR_NO_INTERRUPT);
        uart.write(THR, b'a');
        assert_eq!(uart.read(IIR) & 0x0F, IIR_THR_EMPTY);
        assert_eq!(uart.take_output(), b"a");
    }

    #[test]
    fn test_irq_edges_only_on_changes() {
        let mut uart = configured(IER_ERBFI);
        assert_eq!(uart.take_irq_change(), IrqChange::Unchanged);
        uart.receive(b"a");
        assert_eq!(uart.take_irq_change(), IrqChange::Raised);
        // More data while the line is already high is no new edge.
        uart.receive(b"b");
        assert_eq!(uart.take_irq_change(), IrqChange::Unchanged);
        uart.read(IIR);
        uart.read(LSR);
        assert_eq!(uart.take_irq_change(), IrqChange::Unchanged);
        uart.read(RBR);
        assert_eq!(uart.take_irq_change(), IrqChange::Unchanged);
        uart.read(RBR);
        assert_eq!(uart.take_irq_change(), IrqChange::Lowered);
        uart.read(RBR);
        assert_eq!(uart.take_irq_change(), IrqChange::Unchanged);
    }

    #[test]
    fn test_thr_write_retriggers_line_held_by_thre() {
        let mut uart = configured(0);
        uart.write(IER, IER_ETBEI);
        assert_eq!(uart.take_irq_change(), IrqChange::Raised);
        // Writing THR without acknowledging THRE first: the line drops while
        // THR is full and rises when it empties again.
        uart.write(THR, b'a');
        assert!(uart.irq_level());
        assert_eq!(uart.take_irq_change(), IrqChange::Retriggered);
    }

    #[test]
    fn test_thr_write_keeps_line_held_by_rx_data() {
        let mut uart = configured(IER_ERBFI | IER_ETBEI);
        uart.receive(b"a");
        assert_eq!(uart.take_irq_change(), IrqChange::Raised);
        uart.write(THR, b'b');
        assert_eq!(uart.take_irq_change(), IrqChange::Unchanged);
    }

    #[test]
    fn test_out2_gates_irq() {
        let mut uart = configured(IER_ERBFI);
        uart.write(MCR, MCR_DTR | MCR_RTS);
        uart.receive(b"a");
        assert!(uart.interrupt_pending());
        assert!(!uart.irq_level());
        assert_eq!(uart.take_irq_change(), IrqChange::Unchanged);
        uart.write(MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        assert_eq!(uart.take_irq_change(), IrqChange::Raised);
    }

    #[test]
    fn test_loop_mode_gates_irq() {
        let mut uart = configured(IER_ERBFI);
        uart.write(MCR, MCR_LOOP | MCR_OUT2);
        uart.write(THR, b'a');
        assert!(uart.interrupt_pending());
        assert_eq!(uart.read(IIR) & 0x0F, IIR_RX_DATA);
        assert!(!uart.irq_level());
        uart.write(MCR, MCR_OUT2);
        assert!(uart.irq_level());
    }

    #[test]
    fn test_divisor_latch_round_trip() {
        let mut uart = Uart16550::new();
        uart.write(LCR, LCR_DLAB | 0x03);
        uart.write(DLL, 0x80);
        uart.write(DLM, 0x01);
        assert_eq!(uart.read(DLL), 0x80);
        assert_eq!(uart.read(DLM), 0x01);
        assert_eq!(uart.baud_divisor(), 0x0180);
        assert_eq!(uart.baud_rate(), Some(300));
        // DLAB hides the data registers but not the others.
        assert!(uart.take_output().is_empty());
        assert_eq!(uart.read(LCR), LCR_DLAB | 0x03);
        uart.write(LCR, 0x03);
        assert_eq!(uart.read(IER), 0);
        assert_eq!(uart.baud_divisor(), 0x0180);
    }

    #[test]
    fn test_zero_divisor_has_no_baud_rate() {
        let mut uart = Uart16550::new();
        uart.write(LCR, LCR_DLAB);
        uart.write(DLL, 0);
        uart.write(DLM, 0);
        assert_eq!(uart.baud_rate(), None);
    }

    #[test]
    fn test_register_masks() {
        let mut uart = Uart16550::new();
        uart.write(IER, 0xFF);
        assert_eq!(uart.read(IER), 0x0F);
        uart.write(MCR, 0xFF);
        assert_eq!(uart.read(MCR), 0x1F);
        uart.write(LSR, 0x00);
        uart.write(MSR, 0x00);
        uart.write(MCR, 0);
        assert_eq!(uart.read(LSR), LSR_THRE | LSR_TEMT);
    }

    #[test]
    fn test_undecoded_offsets() {
        let mut uart = Uart16550::new();
        uart.write(8, 0x12);
        assert_eq!(uart.read(8), 0xFF);
        assert_eq!(uart.read(0xFF), 0xFF);
    }

    #[test]
    fn test_empty_rbr_reads_zero() {
        let mut uart = Uart16550::new();
        assert_eq!(uart.read(RBR), 0);
    }

    #[test]
    fn test_reset_keeps_output_and_lowers_irq() {
        let mut uart = configured(IER_ERBFI);
        uart.write(THR, b'z');
        uart.receive(b"a");
        assert_eq!(uart.take_irq_change(), IrqChange::Raised);
        uart.reset();
        assert_eq!(uart.take_irq_change(), IrqChange::Lowered);
        assert_eq!(uart.take_output(), b"z");
        assert_eq!(uart.read(IIR), IIR_NO_INTERRUPT);
        assert_eq!(uart.read(LSR), LSR_THRE | LSR_TEMT);
    }
}
