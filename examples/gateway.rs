//! The main job, for now: seal messages, rotate the business's KEK, shred an
//! epoch, and show what stays readable. (The full gateway, with Signal
//! sessions and a simulated network, grows out of this.)
//!
//! Run: `cargo run --release --example gateway`

use std::sync::Arc;
use std::time::{Duration, Instant};

use custodian::envelope::{Envelope, Kind, Label};
use custodian::ids::{BusinessId, MessageId};
use custodian::keys::{EpochLength, KeyManager, LocalKeyProvider, SecretKey};
use custodian::store::MemoryStore;
use custodian::time::{Clock, ManualClock, Timestamp};
use custodian::vault::{OpenError, Vault};

const HOUR: Duration = Duration::from_secs(3600);
const MESSAGES: u32 = 10_000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let clock = ManualClock::new(Timestamp::from_millis(1_767_225_600_000));
    let store = Arc::new(MemoryStore::new());
    let root = SecretKey::generate();
    let keys = Arc::new(KeyManager::new(
        Arc::new(LocalKeyProvider::new(&root)),
        store.clone(),
    ));
    let vault = Vault::new(keys.clone(), Arc::new(clock.clone()), EpochLength::DEFAULT);
    let business = BusinessId::new(1001).ok_or("business id")?;

    println!("custodian demo: seal, rotate, shred\n");
    println!(
        "sealing {MESSAGES} messages for business {business}, expiring over the next 24 hours"
    );
    let started = Instant::now();
    let mut sealed = Vec::with_capacity(MESSAGES as usize);
    for i in 0..MESSAGES {
        let label = Label {
            kind: if i % 2 == 0 {
                Kind::InboundMessage
            } else {
                Kind::OutboundMessage
            },
            business,
            id: MessageId::random(),
            expiry: clock.now().saturating_add(HOUR * (1 + i % 24)),
            region: "eu".parse()?,
        };
        let text = format!("message {i}: order status update");
        sealed.push((vault.seal(&label, text.as_bytes()).await?, text));
    }
    let elapsed = started.elapsed();
    println!(
        "  sealed in {:.1} ms ({:.0} messages/s); envelope overhead {} bytes",
        elapsed.as_secs_f64() * 1e3,
        f64::from(MESSAGES) / elapsed.as_secs_f64(),
        sealed[0].0.len() - sealed[0].1.len()
    );
    let ring = keys.ring(business).await?;
    println!(
        "  KEK ring: primary v{}, floor v{}",
        ring.primary(),
        ring.floor()
    );

    println!("\nrotating the KEK: add v2, promote, rewrap, raise the floor, retire v1");
    let v2 = keys.add_kek_version(business, clock.now()).await?;
    keys.promote_kek_version(business, v2).await?;
    let rewrapped = keys.rewrap(business).await?;
    keys.raise_decrypt_floor(business, v2).await?;
    keys.retire_kek_version(business, 1).await?;
    let ring = keys.ring(business).await?;
    println!(
        "  rewrapped {rewrapped} epoch keys (no message touched); ring now: primary v{}, floor v{}, versions {:?}",
        ring.primary(),
        ring.floor(),
        ring.versions()
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>()
    );
    let restarted = Vault::new(
        Arc::new(KeyManager::new(
            Arc::new(LocalKeyProvider::new(&root)),
            store.clone(),
        )),
        Arc::new(clock.clone()),
        EpochLength::DEFAULT,
    );
    let readable = count_readable(&restarted, &sealed, business).await;
    println!("  a restarted process reads {readable}/{MESSAGES} messages without KEK v1");

    let victim = Envelope::parse(&sealed[5].0)?.header().epoch();
    println!("\nshredding one epoch early ({victim})");
    keys.destroy_epoch(business, victim, clock.now()).await?;
    let in_epoch = sealed
        .iter()
        .filter(|(s, _)| {
            Envelope::parse(s)
                .map(|e| e.header().epoch() == victim)
                .unwrap_or(false)
        })
        .count();
    let readable = count_readable(&vault, &sealed, business).await;
    println!("  {in_epoch} messages were in it; {readable}/{MESSAGES} remain readable");

    println!("\nadvancing the clock 12 hours and destroying ended epochs");
    clock.advance(HOUR * 12);
    let destroyed = keys.destroy_ended_epochs(clock.now()).await?;
    let readable = count_readable(&vault, &sealed, business).await;
    println!("  {destroyed} epoch keys destroyed; {readable}/{MESSAGES} readable");

    println!("\nadvancing past the last expiry (24 hours)");
    clock.advance(HOUR * 13);
    let destroyed = keys.destroy_ended_epochs(clock.now()).await?;
    let readable = count_readable(&vault, &sealed, business).await;
    let expired = count_refusals(&vault, &sealed, business, |e| {
        matches!(e, OpenError::Expired { .. })
    })
    .await;
    println!(
        "  {destroyed} more epoch keys destroyed; {readable}/{MESSAGES} readable, {expired} refused as expired"
    );

    let other = BusinessId::new(2002).ok_or("business id")?;
    let wrong = count_refusals(&vault, &sealed, other, |e| {
        matches!(e, OpenError::WrongBusiness)
    })
    .await;
    println!("\nanother business asking for these messages is refused {wrong}/{MESSAGES} times");
    Ok(())
}

async fn count_readable(
    vault: &Vault,
    sealed: &[(Vec<u8>, String)],
    business: BusinessId,
) -> usize {
    let mut n = 0;
    for (s, text) in sealed {
        if let Ok(opened) = vault.open(s, business).await {
            assert_eq!(opened.plaintext, text.as_bytes());
            n += 1;
        }
    }
    n
}

async fn count_refusals(
    vault: &Vault,
    sealed: &[(Vec<u8>, String)],
    business: BusinessId,
    kind: impl Fn(&OpenError) -> bool,
) -> usize {
    let mut n = 0;
    for (s, _) in sealed {
        if vault.open(s, business).await.as_ref().is_err_and(&kind) {
            n += 1;
        }
    }
    n
}
