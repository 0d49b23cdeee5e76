#!/usr/bin/env node
// Self-test for peer.js: spawns peer processes and drives them over the same
// stdin/stdout JSON-lines protocol the Rust interop tests use. Prints a
// one-line summary on stdout; exits non-zero on any failure (details and the
// peers' stderr go to stderr). Set SELFTEST_VERBOSE=1 to also dump the peers'
// stderr on success.
'use strict';

const { spawn } = require('child_process');
const path = require('path');
const crypto = require('crypto');
const assert = require('assert/strict');

const PEER = path.join(__dirname, 'peer.js');
const peers = [];

class Peer {
    constructor(label) {
        this.label = label;
        this.nextId = 1;
        this.pending = []; // FIFO of {id, resolve, reject}
        this.stderr = '';
        this.buf = '';
        this.exited = new Promise((resolve) => {
            this.proc = spawn(process.execPath, [PEER], { stdio: ['pipe', 'pipe', 'pipe'] });
            this.proc.on('exit', (code, signal) => resolve({ code, signal }));
        });
        this.proc.stderr.setEncoding('utf8');
        this.proc.stderr.on('data', (d) => { this.stderr += d; });
        this.proc.stdout.setEncoding('utf8');
        this.proc.stdout.on('data', (d) => this._onStdout(d));
        this.exited.then(({ code, signal }) => {
            for (const p of this.pending.splice(0)) {
                p.reject(new Error(`${label}: peer exited (code ${code}, signal ${signal}) with request ${p.id} pending`));
            }
        });
        peers.push(this);
    }

    _onStdout(data) {
        this.buf += data;
        let nl;
        while ((nl = this.buf.indexOf('\n')) !== -1) {
            const line = this.buf.slice(0, nl);
            this.buf = this.buf.slice(nl + 1);
            const p = this.pending.shift();
            if (!p) {
                this.protocolError = `${this.label}: unsolicited stdout line: ${line}`;
                continue;
            }
            let msg;
            try {
                msg = JSON.parse(line);
            } catch (e) {
                p.reject(new Error(`${this.label}: non-JSON stdout line: ${line}`));
                continue;
            }
            if (msg.id !== p.id) {
                p.reject(new Error(`${this.label}: response id ${msg.id} does not match request id ${p.id}`));
                continue;
            }
            p.resolve(msg);
        }
    }

    /** Send a raw line; resolves with the parsed response (ok or not). */
    raw(line, id) {
        return new Promise((resolve, reject) => {
            this.pending.push({ id, resolve, reject });
            this.proc.stdin.write(line + '\n');
        });
    }

    /** Send a command; resolves with the full response object (ok true or false). */
    call(cmd, args = {}) {
        const id = this.nextId++;
        return this.raw(JSON.stringify(Object.assign({ id, cmd }, args)), id);
    }

    /** Send a command that must succeed; resolves with the response. */
    async ok(cmd, args = {}) {
        const res = await this.call(cmd, args);
        if (res.ok !== true) {
            throw new Error(`${this.label}: ${cmd} failed: ${res.kind}: ${res.error}`);
        }
        return res;
    }

    /** Send a command that must fail; resolves with the response. */
    async fails(cmd, args = {}) {
        const res = await this.call(cmd, args);
        if (res.ok !== false || typeof res.error !== 'string' || typeof res.kind !== 'string') {
            throw new Error(`${this.label}: ${cmd} was expected to fail, got ${JSON.stringify(res)}`);
        }
        return res;
    }
}

const b64 = (buf) => Buffer.from(buf).toString('base64');
const unb64 = (s) => Buffer.from(s, 'base64');

function checkPublicKey(s, what) {
    const k = unb64(s);
    assert.equal(k.length, 33, `${what}: length`);
    assert.equal(k[0], 0x05, `${what}: type prefix`);
}

function checkBundle(bundle, identityKey, registrationId) {
    assert.equal(bundle.identityKey, identityKey);
    assert.equal(bundle.registrationId, registrationId);
    checkPublicKey(bundle.signedPreKey.publicKey, 'signedPreKey.publicKey');
    assert.equal(unb64(bundle.signedPreKey.signature).length, 64, 'signature length');
    if (bundle.preKey !== null) checkPublicKey(bundle.preKey.publicKey, 'preKey.publicKey');
}

function strip(res) {
    const { id, ok, ...rest } = res; // eslint-disable-line no-unused-vars
    return rest;
}

const stats = { messages: 0, kinds: {} };

/** from encrypts `plaintext` to `to` (addressed as toName.1); returns the ciphertext. */
async function encrypt(from, toName, plaintext, expectType) {
    const res = await from.ok('encrypt', { name: toName, deviceId: 1, plaintext: b64(plaintext) });
    if (expectType !== undefined) assert.equal(res.type, expectType, `${from.label} -> ${toName}: message type`);
    const body = unb64(res.body);
    assert.equal(body[0], 0x33, 'version byte');
    return { type: res.type, body: res.body };
}

async function decrypt(to, fromName, ct, expected) {
    const res = await to.ok('decrypt', { name: fromName, deviceId: 1, type: ct.type, body: ct.body });
    assert.deepEqual(unb64(res.plaintext), Buffer.from(expected), `${to.label} <- ${fromName}: plaintext`);
    stats.messages++;
}

async function send(from, fromName, to, toName, plaintext, expectType) {
    const ct = await encrypt(from, toName, plaintext, expectType);
    await decrypt(to, fromName, ct, plaintext);
    return ct;
}

async function expectReject(to, fromName, ct, label) {
    const res = await to.fails('decrypt', { name: fromName, deviceId: 1, type: ct.type, body: ct.body });
    stats.kinds[label] = `${res.kind}(${res.error})`;
    return res;
}

function tamper(ct, offsetFromEnd) {
    const body = unb64(ct.body);
    body[body.length - offsetFromEnd] ^= 0x01;
    return { type: ct.type, body: b64(body) };
}

async function run() {
    const alice = new Peer('alice');
    const bob = new Peer('bob');

    // --- init -------------------------------------------------------------
    const aInit = await alice.ok('init', { registrationId: 1234 });
    assert.equal(aInit.registrationId, 1234);
    checkPublicKey(aInit.identityKey, 'alice identityKey');
    const bInit = await bob.ok('init', { preKeys: 3 });
    assert.ok(Number.isInteger(bInit.registrationId) && bInit.registrationId > 0);
    checkPublicKey(bInit.identityKey, 'bob identityKey');

    // --- first contact via Bob's bundle -----------------------------------
    const bundle1 = strip(await bob.ok('bundle'));
    checkBundle(bundle1, bInit.identityKey, bInit.registrationId);
    assert.equal(bundle1.signedPreKey.keyId, 1);
    assert.deepEqual(bundle1.preKey && bundle1.preKey.keyId, 1);

    assert.equal((await alice.ok('hasSession', { name: 'bob', deviceId: 1 })).value, false);
    assert.equal((await alice.ok('identity', { name: 'bob' })).identityKey, null);
    await alice.ok('initOutgoing', { name: 'bob', deviceId: 1, bundle: bundle1 });
    assert.equal((await alice.ok('hasSession', { name: 'bob', deviceId: 1 })).value, true);
    assert.equal((await alice.ok('identity', { name: 'bob' })).identityKey, bInit.identityKey);

    const firstPkmsg = await send(alice, 'alice', bob, 'bob', Buffer.from('hello bob'), 3);
    assert.equal((await bob.ok('hasSession', { name: 'alice', deviceId: 1 })).value, true);
    assert.equal((await bob.ok('identity', { name: 'alice' })).identityKey, aInit.identityKey);
    // Until Bob replies, Alice keeps sending PreKeyWhisperMessages.
    await send(alice, 'alice', bob, 'bob', Buffer.from('still hello'), 3);
    // Bob's replies are plain WhisperMessages; after Alice receives one, so are hers.
    await send(bob, 'bob', alice, 'alice', Buffer.from('hi alice'), 1);
    await send(alice, 'alice', bob, 'bob', Buffer.from('got it'), 1);

    // --- 20 turns each way ------------------------------------------------
    for (let i = 0; i < 20; i++) {
        const len = [0, 1, 15, 16, 17, 255, 4096][i % 7];
        await send(alice, 'alice', bob, 'bob', crypto.randomBytes(len), 1);
        await send(bob, 'bob', alice, 'alice', crypto.randomBytes(len), 1);
    }

    // libsignal (Rust/Java) numbers WhisperMessage 2; the peer accepts it as an alias of 1.
    {
        const ct = await encrypt(alice, 'bob', Buffer.from('type 2 alias'), 1);
        await decrypt(bob, 'alice', { type: 2, body: ct.body }, Buffer.from('type 2 alias'));
    }

    // --- out-of-order delivery (both directions, 3 messages each) ----------
    {
        const pts = [0, 1, 2].map((i) => Buffer.from(`a-ooo-${i}`));
        const cts = [];
        for (const pt of pts) cts.push(await encrypt(alice, 'bob', pt, 1));
        for (const i of [2, 0, 1]) await decrypt(bob, 'alice', cts[i], pts[i]);
    }
    {
        const pts = [0, 1, 2].map((i) => Buffer.from(`b-ooo-${i}`));
        const cts = [];
        for (const pt of pts) cts.push(await encrypt(bob, 'alice', pt, 1));
        for (const i of [1, 2, 0]) await decrypt(alice, 'bob', cts[i], pts[i]);
    }
    // Out of order across a ratchet step: Bob's message from the old chain
    // arrives after newer traffic.
    {
        const late = await encrypt(bob, 'alice', Buffer.from('late'), 1);
        await send(bob, 'bob', alice, 'alice', Buffer.from('early'), 1);
        await send(alice, 'alice', bob, 'bob', Buffer.from('ratchet'), 1);
        const newer = await send(bob, 'bob', alice, 'alice', Buffer.from('newer chain'), 1);
        void newer;
        await decrypt(alice, 'bob', late, Buffer.from('late'));
    }

    // --- tampered ciphertexts are rejected; the genuine one still decrypts --
    {
        const pt = Buffer.from('integrity matters');
        const ct = await encrypt(alice, 'bob', pt, 1);
        await expectReject(bob, 'alice', tamper(ct, 1), 'tamperedMac');
        await expectReject(bob, 'alice', tamper(ct, 12), 'tamperedCiphertext');
        await decrypt(bob, 'alice', ct, pt);

        // --- replay of a WhisperMessage is rejected ----------------------
        await expectReject(bob, 'alice', ct, 'replayedWhisper');
        // --- replay of the very first PreKeyWhisperMessage is rejected ---
        await expectReject(bob, 'alice', firstPkmsg, 'replayedPreKeyWhisper');
        // Wrong type for the body is rejected too.
        await expectReject(bob, 'alice', { type: 3, body: (await encrypt(alice, 'bob', pt, 1)).body }, 'wrongType');
        // Session still healthy afterwards.
        await send(alice, 'alice', bob, 'bob', Buffer.from('after rejects'), 1);
        await send(bob, 'bob', alice, 'alice', Buffer.from('after rejects too'), 1);
    }

    // --- prekey exhaustion and consumption --------------------------------
    const carol = new Peer('carol');
    const cInit = await carol.ok('init', {});
    const bundle2 = strip(await bob.ok('bundle'));
    const bundle3 = strip(await bob.ok('bundle'));
    assert.equal(bundle2.preKey.keyId, 2);
    assert.equal(bundle3.preKey.keyId, 3);
    const bundleNone = strip(await bob.ok('bundle'));
    checkBundle(bundleNone, bInit.identityKey, bInit.registrationId);
    assert.equal(bundleNone.preKey, null, 'prekeys exhausted -> preKey null');
    assert.equal(strip(await bob.ok('bundle')).preKey, null, 'still null');

    // Carol uses one-time prekey 2; Bob must delete it once consumed.
    await carol.ok('initOutgoing', { name: 'bob', deviceId: 1, bundle: bundle2 });
    await send(carol, 'carol', bob, 'bob', Buffer.from('carol via prekey 2'), 3);
    await send(bob, 'bob', carol, 'carol', Buffer.from('hi carol'), 1);
    // A fresh session reusing the consumed prekey 2 must fail on Bob's side.
    await carol.ok('initOutgoing', { name: 'bob', deviceId: 1, bundle: bundle2 });
    const reuse = await encrypt(carol, 'bob', Buffer.from('reusing prekey 2'), 3);
    await expectReject(bob, 'carol', reuse, 'consumedPreKey');
    // The same failed message claimed as coming from Alice must not replace
    // Bob's record of Alice's identity (identity bookkeeping only on success).
    await bob.fails('decrypt', { name: 'alice', deviceId: 1, type: reuse.type, body: reuse.body });
    assert.equal((await bob.ok('identity', { name: 'alice' })).identityKey, aInit.identityKey);

    // A session without any one-time prekey still works.
    await carol.ok('initOutgoing', { name: 'bob', deviceId: 1, bundle: bundleNone });
    await send(carol, 'carol', bob, 'bob', Buffer.from('carol without one-time prekey'), 3);
    await send(bob, 'bob', carol, 'carol', Buffer.from('hi again carol'), 1);
    await send(carol, 'carol', bob, 'bob', Buffer.from('steady state'), 1);
    assert.equal((await bob.ok('identity', { name: 'carol' })).identityKey, cInit.identityKey);
    // Alice's session with Bob is unaffected by all of this.
    await send(alice, 'alice', bob, 'bob', Buffer.from('still here'), 1);
    await send(bob, 'bob', alice, 'alice', Buffer.from('me too'), 1);

    // --- bundle signature check --------------------------------------------
    {
        const bad = JSON.parse(JSON.stringify(bundleNone));
        const sig = unb64(bad.signedPreKey.signature);
        sig[10] ^= 0x01;
        bad.signedPreKey.signature = b64(sig);
        const res = await carol.fails('initOutgoing', { name: 'bobsig', deviceId: 1, bundle: bad });
        stats.kinds.badSignature = `${res.kind}(${res.error})`;
        assert.equal(res.kind, 'BadSignatureError');
        // libsignal-node itself accepts it (documenting its behaviour).
        await carol.ok('initOutgoing', { name: 'bobsig', deviceId: 1, bundle: bad, verifySignature: false });
    }

    // --- robustness: bad requests never crash the peer ----------------------
    {
        const r1 = await alice.raw('this is not json', null);
        assert.equal(r1.ok, false);
        assert.equal(r1.kind, 'RequestError');
        await alice.fails('frobnicate');
        await alice.fails('encrypt', { name: 'nobody', deviceId: 1, plaintext: 'AA==' });
        await alice.fails('decrypt', { name: 'nobody', deviceId: 1, type: 1, body: 'AAAA' });
        await alice.fails('decrypt', { name: 'bob', deviceId: 1, type: 1, body: 'not base64!' });
        await alice.fails('decrypt', { name: 'bob', deviceId: 1, type: 3, body: 'MwAAAA==' });
        await alice.fails('initOutgoing', { name: 'x', deviceId: 1, bundle: { registrationId: 1 } });
        stats.kinds.noSession = (await alice.fails('decrypt', { name: 'nobody', deviceId: 1, type: 1, body: 'MwAA' })).kind;
        const fresh = new Peer('fresh');
        assert.equal((await fresh.fails('bundle')).kind, 'RequestError');
        await fresh.ok('exit');
        assert.deepEqual(await fresh.exited, { code: 0, signal: null });
        // Still fully functional.
        await send(alice, 'alice', bob, 'bob', Buffer.from('survived'), 1);
    }

    // --- shutdown: "exit" and EOF both exit 0 -------------------------------
    await alice.ok('exit');
    assert.deepEqual(await alice.exited, { code: 0, signal: null });
    bob.proc.stdin.end();
    assert.deepEqual(await bob.exited, { code: 0, signal: null });
    await carol.ok('exit');
    assert.deepEqual(await carol.exited, { code: 0, signal: null });

    for (const p of peers) {
        if (p.protocolError) throw new Error(p.protocolError);
        if (p.buf !== '') throw new Error(`${p.label}: trailing partial stdout: ${p.buf}`);
    }
}

const started = Date.now();
run().then(() => {
    const kinds = Object.entries(stats.kinds).map(([k, v]) => `${k}=${v}`).join(' ');
    if (process.env.SELFTEST_VERBOSE) {
        for (const p of peers) process.stderr.write(`--- ${p.label} stderr ---\n${p.stderr}\n`);
    }
    process.stdout.write(`selftest OK: ${stats.messages} messages decrypted across ${peers.length} peers in ` +
        `${Date.now() - started} ms; rejections: ${kinds}\n`);
    process.exit(0);
}, (e) => {
    process.stderr.write(`selftest FAILED: ${e && e.stack ? e.stack : e}\n`);
    for (const p of peers) {
        process.stderr.write(`--- ${p.label} stderr ---\n${p.stderr.slice(-4000)}\n`);
        try { p.proc.kill(); } catch (_) { /* ignore */ }
    }
    process.stdout.write(`selftest FAILED: ${e && e.message ? e.message.split('\n')[0] : e}\n`);
    process.exit(1);
});
