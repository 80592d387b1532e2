//! The client against scripted (hostile) servers: every bad reply is an error, never
//! a panic, an unbounded allocation or bytes taken from the wrong place.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use super::client::{Client, ClientError};
use super::wire::{self, Header, HEADER_SIZE};

type Reply = Box<dyn FnOnce(Header) -> Vec<u8> + Send>;

/// A server thread answering each request with the next scripted reply.
fn server(replies: Vec<Reply>) -> (UnixStream, JoinHandle<()>) {
    let (client, mut srv) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        for reply in replies {
            let mut hb = [0u8; HEADER_SIZE];
            if srv.read_exact(&mut hb).is_err() {
                return;
            }
            let h = Header::decode(&hb);
            let mut rest = vec![0u8; h.size as usize - HEADER_SIZE];
            srv.read_exact(&mut rest).unwrap();
            let _ = srv.write_all(&reply(h));
        }
    });
    (client, t)
}

/// A well-formed reply to `h` carrying `payload`.
fn ok(h: Header, payload: &[u8]) -> Vec<u8> {
    let r = Header {
        size: (HEADER_SIZE + payload.len()) as u32,
        flags: 1,
        ..h
    };
    [&r.encode()[..], payload].concat()
}

fn version() -> Reply {
    Box::new(|h| ok(h, b"\0\0\0\0{}\0"))
}

fn connected(mut more: Vec<Reply>) -> (Client, JoinHandle<()>) {
    let mut all = vec![version()];
    all.append(&mut more);
    let (s, t) = server(all);
    (Client::over(s).unwrap(), t)
}

#[test]
fn a_reply_shorter_than_its_header_is_refused() {
    let (s, t) = server(vec![Box::new(|h| {
        Header {
            size: 3,
            flags: 1,
            ..h
        }
        .encode()
        .to_vec()
    })]);
    let e = Client::over(s).err().unwrap();
    assert!(matches!(e, ClientError::Protocol { .. }), "{e}");
    t.join().unwrap();
}

#[test]
fn a_huge_reply_is_refused_before_anything_is_allocated() {
    let (mut c, t) = connected(vec![Box::new(|h| {
        Header {
            size: u32::MAX,
            flags: 1,
            ..h
        }
        .encode()
        .to_vec()
    })]);
    let e = c.device_info().unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
    t.join().unwrap();
}

#[test]
fn a_reply_to_another_message_or_command_is_refused() {
    let (mut c, t) = connected(vec![Box::new(|h| {
        ok(Header { id: h.id + 1, ..h }, &[0; 16])
    })]);
    let e = c.device_info().unwrap_err();
    assert!(
        e.to_string().contains("expected the reply to message"),
        "{e}"
    );
    t.join().unwrap();
}

#[test]
fn a_region_read_reply_of_the_wrong_length_leaves_the_buffer_alone() {
    let (mut c, t) = connected(vec![
        // Claims 4 bytes, carries 8.
        Box::new(|h| {
            let mut p = vec![0u8; 16];
            p[12..16].copy_from_slice(&4u32.to_le_bytes());
            p.extend_from_slice(&[0xaa; 8]);
            ok(h, &p)
        }),
        // Claims 8, carries 4.
        Box::new(|h| {
            let mut p = vec![0u8; 16];
            p[12..16].copy_from_slice(&8u32.to_le_bytes());
            p.extend_from_slice(&[0xaa; 4]);
            ok(h, &p)
        }),
    ]);
    for _ in 0..2 {
        let mut data = [0x11u8; 4];
        let e = c.region_read(0, 0, &mut data).unwrap_err();
        assert!(matches!(e, ClientError::Protocol { .. }), "{e}");
        assert_eq!(data, [0x11; 4]);
    }
    t.join().unwrap();
}

#[test]
fn a_server_error_and_a_closed_connection_are_errors() {
    let (mut c, t) = connected(vec![Box::new(|h| {
        let r = Header {
            size: HEADER_SIZE as u32,
            flags: 1 | (1 << 5),
            error: 22,
            ..h
        };
        r.encode().to_vec()
    })]);
    let e = c.region_write(0, 0, &[1, 2, 3, 4]).unwrap_err();
    assert!(matches!(e, ClientError::Server { errno: 22, .. }), "{e}");
    t.join().unwrap();
    // The script is over: the server side is closed.
    let e = c.region_write(0, 0, &[1]).unwrap_err();
    assert!(
        matches!(e, ClientError::Closed { .. } | ClientError::Io { .. }),
        "{e}"
    );
}

#[test]
fn a_device_that_is_not_pci_is_refused() {
    let (mut c, t) = connected(vec![Box::new(|h| {
        let p = wire::Fields::default().u32(16).u32(0).u32(9).u32(4);
        ok(h, &p.0)
    })]);
    let e = c.device_info().unwrap_err();
    assert!(e.to_string().contains("not a PCI device"), "{e}");
    t.join().unwrap();
}
