//! Voicemail as a caller hears it, sans-IO: `VoiceMail()` takes a message, and
//! `VoiceMailMain()` is the owner's menu. The call feeds a [`Session`] keys, the ends of
//! what it played, timers and the driver's answers; the session says what to play,
//! what to record and what to ask the driver ([`VmRequest`]). Where the audio lives and
//! when a message counts as saved is the driver's and ADR 0014's business: the session
//! only says "saved" once the driver answered that it is.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pbx_dialplan::{digit_prompts, number_prompts, VmGreeting};
use pbx_state::voicemail::{
    pin_matches, valid_pin, Codec, Folder, Greeting, Mailbox, VoiceMessage, VoicemailOp,
    MAX_MESSAGES,
};

/// The longest message (Asterisk's `maxsecs` as commonly set): the recording stops there.
pub const MAX_MESSAGE: Duration = Duration::from_secs(300);
/// The longest greeting.
pub const MAX_GREETING: Duration = Duration::from_secs(60);
/// A recording shorter than this is nothing said (a caller hanging up at the tone) and
/// is not kept (Asterisk's `minsecs`).
pub const MIN_RECORDING_MS: u64 = 1_000;
/// Keys awaited after a menu before it is said again, and between the keys of a
/// mailbox number or PIN.
pub const KEY_TIMEOUT: Duration = Duration::from_secs(8);
/// Wrong logins before the caller is sent away, as Asterisk's `maxlogins`.
pub const LOGIN_ATTEMPTS: u32 = 3;
/// Menus said without an answer before the session ends.
const MENU_REPEATS: u32 = 3;

/// What the session needs from outside the call.
#[derive(Debug, Clone, PartialEq)]
pub enum VmRequest {
    /// The mailbox as the cluster has it; answer [`VmReply::Mailbox`].
    Open { mailbox: String },
    /// A message's or greeting's audio in `payload_type` (0 PCMU, 8 PCMA); answer
    /// [`VmReply::Audio`].
    Fetch {
        blob: String,
        codec: Codec,
        holders: Vec<u64>,
        payload_type: u8,
    },
    /// Keep what was recorded since [`VmStep::Record`] (in `codec`): a message for
    /// `mailboxes`, or the first mailbox's greeting. Answer [`VmReply::Stored`] only
    /// once it is durable on a majority and committed (ADR 0014). Shorter than
    /// [`MIN_RECORDING_MS`]: dropped, answered `Err(StoreError::TooShort)`.
    Store {
        mailboxes: Vec<String>,
        what: Recorded,
        codec: Codec,
    },
    /// Drop what was recorded (the caller went away from a greeting unfinished).
    Discard,
    /// A change to the mailbox (heard, deleted); answer [`VmReply::Updated`].
    Update(VoicemailOp),
    /// A new PIN for `mailbox` (hashed with a fresh salt by the driver); answer
    /// [`VmReply::Updated`].
    SetPin { mailbox: String, pin: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Message { caller_id: String },
    Greeting(Greeting),
}

#[derive(Debug, Clone, PartialEq)]
pub enum VmReply {
    /// `None`: no such mailbox.
    Mailbox(Option<Box<Mailbox>>),
    /// `None`: no holder could give it.
    Audio(Option<Arc<[u8]>>),
    Stored(Result<(), StoreError>),
    Updated(bool),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    TooShort,
    MailboxFull,
    /// Not durable on a majority, or not committed: the caller is told it failed.
    Failed(String),
}

/// What the call does for the session.
#[derive(Debug, Clone, PartialEq)]
pub enum VmStep {
    /// Play these prompts to the caller ([`Session::on_played`] at their end).
    Prompts(Vec<String>),
    /// Play this audio, already in the caller's payload type.
    Audio(Arc<[u8]>),
    /// Stop what is playing (a key interrupted it).
    StopPlay,
    /// Record what the caller says, up to this many bytes.
    Record {
        max_bytes: usize,
    },
    Request(VmRequest),
    /// Over: the dialplan goes on, `${VMSTATUS}` set to this (VoiceMail only).
    Finished(Option<&'static str>),
}

/// Where a session is.
#[derive(Debug, Clone, PartialEq)]
enum State {
    // -- VoiceMail ---------------------------------------------------------------
    Opening,
    /// The owner's greeting (or recorded name) asked for; what plays after it.
    FetchingGreeting(Vec<String>),
    /// The owner's recorded audio playing, these prompts after it; `#` skips to the tone.
    OwnGreeting(Vec<String>),
    /// The greeting's prompts and instructions; `#` goes straight to the tone.
    Greeting,
    Tone,
    Recording,
    Storing,
    // -- VoiceMailMain -----------------------------------------------------------
    /// Prompt then keys for the mailbox number.
    AskMailbox,
    /// Prompt then keys for the PIN.
    AskPin,
    /// The mailbox asked for, to check the PIN against.
    Checking {
        pin: Option<String>,
    },
    /// "You have ..., press 1 ...": keys choose.
    MainMenu,
    /// Message `index` announced ("message 3").
    Announcing,
    FetchingMessage,
    PlayingMessage,
    /// "To repeat this message, press 5 ...".
    MessageMenu,
    Options,
    /// Keys of the new PIN, the first time and then again.
    NewPin {
        first: Option<String>,
    },
    /// A greeting's instructions, then the tone, then recording it.
    GreetingPrompt(Greeting),
    GreetingTone(Greeting),
    RecordingGreeting(Greeting),
    StoringGreeting,
    SettingPin,
    // -- both ---------------------------------------------------------------------
    /// Last words played, then the session is over with this status.
    Closing(Option<&'static str>),
    /// Something said, then back to this menu.
    Saying(Menu),
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Menu {
    Main,
    /// The current message again (after it was deleted: the next one).
    Message,
    Next,
    Options,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Leave {
        mailboxes: Vec<String>,
        greeting: VmGreeting,
        skip_instructions: bool,
        caller_id: String,
    },
    Main {
        given: Option<String>,
        skip_pin: bool,
    },
}

/// One voicemail application running on a call.
#[derive(Debug)]
pub struct Session {
    kind: Kind,
    state: State,
    /// The caller's G.711 payload type (0 or 8).
    payload_type: u8,
    out: VecDeque<VmStep>,
    /// Something playing now (a key may stop it).
    playing: bool,
    /// Keys gathered (mailbox number, PIN).
    keys: String,
    /// Keys awaited until then; the state says what for.
    deadline: Option<Instant>,
    mailbox: String,
    owned: Option<Box<Mailbox>>,
    attempts: u32,
    repeats: u32,
    /// The messages being listened to (new ones first) and which one.
    list: Vec<VoiceMessage>,
    index: usize,
    /// Audio fetched for the current message.
    audio: Option<Arc<[u8]>>,
}

impl Session {
    /// `VoiceMail()` for the caller `caller_id` (`"Name" <num>`).
    pub fn leave(
        mailboxes: Vec<String>,
        greeting: VmGreeting,
        skip_instructions: bool,
        caller_id: String,
        payload_type: u8,
    ) -> Session {
        let first = mailboxes.first().cloned().unwrap_or_default();
        let mut s = Session::new(
            Kind::Leave {
                mailboxes,
                greeting,
                skip_instructions,
                caller_id,
            },
            payload_type,
        );
        s.mailbox = first.clone();
        s.state = State::Opening;
        s.request(VmRequest::Open { mailbox: first });
        s
    }

    /// `VoiceMailMain()`: for `mailbox` when given (the PIN still asked unless
    /// `skip_pin`), else the caller keys the mailbox first.
    pub fn main(
        mailbox: Option<String>,
        skip_pin: bool,
        payload_type: u8,
        now: Instant,
    ) -> Session {
        let mut s = Session::new(
            Kind::Main {
                given: mailbox.clone(),
                skip_pin,
            },
            payload_type,
        );
        s.start_login(now);
        s
    }

    fn new(kind: Kind, payload_type: u8) -> Session {
        Session {
            kind,
            state: State::Done,
            payload_type,
            out: VecDeque::new(),
            playing: false,
            keys: String::new(),
            deadline: None,
            mailbox: String::new(),
            owned: None,
            attempts: 0,
            repeats: 0,
            list: Vec::new(),
            index: 0,
            audio: None,
        }
    }

    pub fn poll_step(&mut self) -> Option<VmStep> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    fn codec(&self) -> Codec {
        if self.payload_type == 8 {
            Codec::Pcma
        } else {
            Codec::Pcmu
        }
    }

    fn request(&mut self, r: VmRequest) {
        self.out.push_back(VmStep::Request(r));
    }

    fn play(&mut self, prompts: Vec<String>) {
        self.playing = true;
        self.out.push_back(VmStep::Prompts(prompts));
    }

    fn play_audio(&mut self, audio: Arc<[u8]>) {
        self.playing = true;
        self.out.push_back(VmStep::Audio(audio));
    }

    fn stop_playing(&mut self) {
        if std::mem::take(&mut self.playing) {
            self.out.push_back(VmStep::StopPlay);
        }
    }

    fn record(&mut self, max: Duration) {
        self.out.push_back(VmStep::Record {
            max_bytes: max.as_millis() as usize * 8,
        });
    }

    fn finish(&mut self, status: Option<&'static str>) {
        self.stop_playing();
        self.deadline = None;
        self.state = State::Done;
        self.out.push_back(VmStep::Finished(status));
    }

    /// Says `prompts`, then ends with `status`.
    fn close(&mut self, prompts: Vec<String>, status: Option<&'static str>) {
        self.deadline = None;
        self.state = State::Closing(status);
        self.play(prompts);
    }

    // ----- inputs ---------------------------------------------------------------

    /// The prompt or audio last asked for has been played to its end.
    pub fn on_played(&mut self, now: Instant) {
        if !std::mem::take(&mut self.playing) {
            return;
        }
        match self.state.clone() {
            State::Greeting => self.tone(State::Tone),
            State::OwnGreeting(after) if after.is_empty() => self.tone(State::Tone),
            State::OwnGreeting(after) => {
                self.state = State::Greeting;
                self.play(after);
            }
            State::Tone => {
                self.state = State::Recording;
                self.record(MAX_MESSAGE);
            }
            State::AskMailbox | State::AskPin | State::NewPin { .. } => {
                self.deadline = Some(now + KEY_TIMEOUT)
            }
            State::MainMenu | State::MessageMenu | State::Options => {
                self.deadline = Some(now + KEY_TIMEOUT)
            }
            State::Announcing => self.fetch_message(),
            State::PlayingMessage => {
                self.state = State::MessageMenu;
                self.play(vec!["vm-msginstruct".into()]);
            }
            State::GreetingPrompt(g) => self.tone(State::GreetingTone(g)),
            State::GreetingTone(g) => {
                self.state = State::RecordingGreeting(g);
                self.record(MAX_GREETING);
            }
            State::Saying(menu) => self.menu(now, menu),
            State::Closing(status) => self.finish(status),
            _ => {}
        }
    }

    fn tone(&mut self, next: State) {
        self.state = next;
        self.play(vec!["beep".into()]);
    }

    /// A key from the caller (RFC 4733 or SIP INFO).
    pub fn on_digit(&mut self, now: Instant, key: char) {
        match self.state.clone() {
            State::Greeting | State::OwnGreeting(_) if key == '#' => {
                self.stop_playing();
                self.tone(State::Tone);
            }
            State::Recording if key == '#' => self.store_message(),
            State::RecordingGreeting(g) if key == '#' => self.store_greeting(g),
            State::AskMailbox | State::AskPin | State::NewPin { .. } => {
                self.stop_playing();
                if key == '#' {
                    self.keys_done(now);
                } else {
                    self.keys.push(key);
                    self.deadline = Some(now + KEY_TIMEOUT);
                }
            }
            State::MainMenu => {
                self.stop_playing();
                self.main_key(now, key);
            }
            State::Announcing
            | State::FetchingMessage
            | State::PlayingMessage
            | State::MessageMenu => {
                self.stop_playing();
                self.message_key(now, key);
            }
            State::Options => {
                self.stop_playing();
                self.options_key(now, key);
            }
            _ => {}
        }
    }

    pub fn on_timeout(&mut self, now: Instant) {
        if self.deadline.is_none_or(|d| now < d) {
            return;
        }
        self.deadline = None;
        match self.state {
            State::AskMailbox | State::AskPin | State::NewPin { .. } => self.keys_done(now),
            State::MainMenu | State::MessageMenu | State::Options => {
                self.repeats += 1;
                if self.repeats >= MENU_REPEATS {
                    self.close(vec!["vm-goodbye".into()], None);
                } else {
                    let menu = match self.state {
                        State::MainMenu => Menu::Main,
                        State::MessageMenu => Menu::Message,
                        _ => Menu::Options,
                    };
                    self.menu(now, menu);
                }
            }
            _ => {}
        }
    }

    /// The recording is as long as it may be.
    pub fn on_recording_full(&mut self) {
        match self.state {
            State::Recording => self.store_message(),
            State::RecordingGreeting(g) => self.store_greeting(g),
            _ => {}
        }
    }

    /// The caller hung up: a message being recorded is kept all the same (hanging up is
    /// how most callers end one), a greeting is not.
    pub fn on_hangup(&mut self) {
        match self.state {
            State::Recording => self.store_message(),
            State::RecordingGreeting(_) => self.request(VmRequest::Discard),
            _ => {}
        }
        self.deadline = None;
        self.state = State::Done;
    }

    /// The driver's answer to a [`VmRequest`].
    pub fn on_reply(&mut self, now: Instant, reply: VmReply) {
        match (self.state.clone(), reply) {
            (State::Opening, VmReply::Mailbox(m)) => self.opened(m),
            (State::FetchingGreeting(after), VmReply::Audio(a)) => match a {
                Some(a) => {
                    self.state = State::OwnGreeting(after);
                    self.play_audio(a);
                }
                None => {
                    // No holder gave it: the greeting of a mailbox without one.
                    self.state = State::Greeting;
                    let p = self.plain_greeting(true);
                    self.play(p);
                }
            },
            (State::Storing, VmReply::Stored(r)) => match r {
                Ok(()) => self.close(
                    vec!["vm-msgsaved".into(), "vm-goodbye".into()],
                    Some("SUCCESS"),
                ),
                Err(StoreError::TooShort) => self.finish(Some("USEREXIT")),
                Err(StoreError::MailboxFull) => {
                    self.close(vec!["vm-mailboxfull".into()], Some("FAILED"))
                }
                Err(StoreError::Failed(_)) => {
                    self.close(vec!["vm-savefailed".into()], Some("FAILED"))
                }
            },
            (State::Checking { pin }, VmReply::Mailbox(m)) => self.check_login(now, pin, m),
            (State::FetchingMessage, VmReply::Audio(a)) => self.message_fetched(now, a),
            (State::StoringGreeting, VmReply::Stored(r)) => {
                let p = match r {
                    Ok(()) => "vm-msgsaved",
                    Err(_) => "vm-savefailed",
                };
                self.state = State::Saying(Menu::Options);
                self.play(vec![p.into()]);
            }
            (State::SettingPin, VmReply::Updated(ok)) => {
                let p = if ok {
                    "vm-passchanged"
                } else {
                    "vm-savefailed"
                };
                self.state = State::Saying(Menu::Options);
                self.play(vec![p.into()]);
            }
            // Marking a message heard, deleting it: nothing waits for those.
            _ => {}
        }
    }

    // ----- VoiceMail ------------------------------------------------------------

    fn skip_instructions(&self) -> bool {
        matches!(
            self.kind,
            Kind::Leave {
                skip_instructions: true,
                ..
            }
        )
    }

    fn opened(&mut self, m: Option<Box<Mailbox>>) {
        let Kind::Leave { greeting, .. } = self.kind.clone() else {
            return;
        };
        let Some(m) = m else {
            // As Asterisk: a warning, VMSTATUS=FAILED, the dialplan goes on.
            self.finish(Some("FAILED"));
            return;
        };
        if m.messages.len() >= MAX_MESSAGES {
            self.close(vec!["vm-mailboxfull".into()], Some("FAILED"));
            return;
        }
        let own = match greeting {
            VmGreeting::Unavailable => m.greetings.get(&Greeting::Unavailable),
            VmGreeting::Busy => m.greetings.get(&Greeting::Busy),
            VmGreeting::Plain => None,
        };
        // The owner's greeting, then the instructions; or its recorded name in place of
        // the extension's digits ("<name> is unavailable"), as Asterisk does.
        let (audio, after) = match (own, m.greetings.get(&Greeting::Name)) {
            (Some(g), _) => (Some(g), self.instructions()),
            (None, Some(name)) => (Some(name), self.plain_greeting(false)),
            (None, None) => (None, Vec::new()),
        };
        match audio {
            Some(g) => {
                self.state = State::FetchingGreeting(after);
                let r = VmRequest::Fetch {
                    blob: g.blob.clone(),
                    codec: g.codec,
                    holders: g.holders.clone(),
                    payload_type: self.payload_type,
                };
                self.request(r);
            }
            None => {
                self.state = State::Greeting;
                let p = self.plain_greeting(true);
                self.play(p);
            }
        }
    }

    /// "Please leave your message after the tone ..." unless `s`.
    fn instructions(&self) -> Vec<String> {
        if self.skip_instructions() {
            Vec::new()
        } else {
            vec!["vm-intro".into()]
        }
    }

    /// "The person at extension 1001 is unavailable. Please leave your message ...";
    /// without `extension` only from "is unavailable" on (after a recorded name).
    fn plain_greeting(&self, extension: bool) -> Vec<String> {
        let Kind::Leave { greeting, .. } = &self.kind else {
            return Vec::new();
        };
        let mut p = Vec::new();
        if extension {
            let number = self.mailbox.split('@').next().unwrap_or_default();
            p.push("vm-theperson".to_string());
            p.extend(digit_prompts(number));
        }
        p.push(match greeting {
            VmGreeting::Busy => "vm-isonphone".into(),
            _ => "vm-isunavail".into(),
        });
        p.extend(self.instructions());
        p
    }

    fn store_message(&mut self) {
        let Kind::Leave {
            mailboxes,
            caller_id,
            ..
        } = self.kind.clone()
        else {
            return;
        };
        self.state = State::Storing;
        let codec = self.codec();
        self.request(VmRequest::Store {
            mailboxes,
            what: Recorded::Message { caller_id },
            codec,
        });
    }

    // ----- VoiceMailMain --------------------------------------------------------

    fn start_login(&mut self, now: Instant) {
        self.keys.clear();
        let Kind::Main { given, skip_pin } = self.kind.clone() else {
            return;
        };
        match given {
            Some(m) if self.attempts == 0 => {
                self.mailbox = m.clone();
                if skip_pin {
                    self.state = State::Checking { pin: None };
                    self.request(VmRequest::Open { mailbox: m });
                } else {
                    self.ask(State::AskPin, "vm-password");
                }
            }
            _ => {
                let p = if self.attempts == 0 {
                    "vm-login"
                } else {
                    "vm-incorrect-mailbox"
                };
                self.ask(State::AskMailbox, p);
            }
        }
        let _ = now;
    }

    fn ask(&mut self, state: State, prompt: &str) {
        self.keys.clear();
        self.state = state;
        self.deadline = None;
        self.play(vec![prompt.into()]);
    }

    /// `#` or a pause ended the keys of a number or PIN.
    fn keys_done(&mut self, now: Instant) {
        self.deadline = None;
        let keys = std::mem::take(&mut self.keys);
        match self.state.clone() {
            State::AskMailbox => {
                // A mailbox keyed: the PIN asked even for one that does not exist
                // (which mailboxes exist is not told).
                self.mailbox = pbx_dialplan::mailbox_spec(&keys).unwrap_or_default();
                self.ask(State::AskPin, "vm-password");
            }
            State::AskPin => {
                self.state = State::Checking { pin: Some(keys) };
                let mailbox = self.mailbox.clone();
                self.request(VmRequest::Open { mailbox });
            }
            State::NewPin { first: None } => {
                if valid_pin(&keys) {
                    self.ask(State::NewPin { first: Some(keys) }, "vm-reenterpassword");
                } else {
                    self.state = State::Saying(Menu::Options);
                    self.play(vec!["vm-mismatch".into()]);
                }
            }
            State::NewPin { first: Some(first) } => {
                if first == keys {
                    self.state = State::SettingPin;
                    let mailbox = self.mailbox.clone();
                    self.request(VmRequest::SetPin { mailbox, pin: keys });
                } else {
                    self.state = State::Saying(Menu::Options);
                    self.play(vec!["vm-mismatch".into()]);
                }
            }
            _ => {}
        }
        let _ = now;
    }

    fn check_login(&mut self, now: Instant, pin: Option<String>, m: Option<Box<Mailbox>>) {
        let ok = match (&m, &pin) {
            (Some(_), None) => true, // `s`: the dialplan vouched for the caller
            (Some(m), Some(pin)) => m.pin_hash.as_deref().is_some_and(|h| pin_matches(h, pin)),
            (None, _) => false,
        };
        if ok {
            self.owned = m;
            self.attempts = 0;
            self.repeats = 0;
            self.menu(now, Menu::Main);
            return;
        }
        self.attempts += 1;
        if self.attempts >= LOGIN_ATTEMPTS {
            self.close(vec!["vm-incorrect".into(), "vm-goodbye".into()], None);
        } else {
            self.start_login(now);
        }
    }

    /// New messages first, then old ones, each in the order they came.
    fn messages(&self) -> Vec<VoiceMessage> {
        let Some(m) = &self.owned else {
            return Vec::new();
        };
        let mut list: Vec<VoiceMessage> = m.messages.values().cloned().collect();
        list.sort_by_key(|m| (m.folder, m.id));
        list
    }

    fn menu(&mut self, now: Instant, menu: Menu) {
        let _ = now;
        self.deadline = None;
        match menu {
            Menu::Main => {
                self.state = State::MainMenu;
                let list = self.messages();
                let new = list.iter().filter(|m| m.folder == Folder::Inbox).count();
                let old = list.len() - new;
                let mut p = vec!["vm-youhave".to_string()];
                let count = |p: &mut Vec<String>, n: usize, folder: &str| {
                    if n == 0 {
                        p.push("vm-no".into());
                    } else {
                        p.extend(number_prompts(n as i64));
                    }
                    p.push(folder.into());
                    p.push(if n == 1 { "vm-message" } else { "vm-messages" }.into());
                };
                count(&mut p, new, "vm-INBOX");
                if old > 0 {
                    p.push("vm-and".into());
                    count(&mut p, old, "vm-Old");
                }
                if !list.is_empty() {
                    p.push("vm-onefor".into());
                }
                p.push("vm-opts".into());
                self.play(p);
            }
            Menu::Message => self.announce(),
            Menu::Next => {
                if self.index + 1 < self.list.len() {
                    self.index += 1;
                    self.announce();
                } else {
                    self.state = State::Saying(Menu::Main);
                    self.play(vec!["vm-nomore".into()]);
                }
            }
            Menu::Options => {
                self.state = State::Options;
                self.play(vec!["vm-options".into()]);
            }
        }
    }

    fn main_key(&mut self, now: Instant, key: char) {
        self.repeats = 0;
        match key {
            '1' => {
                self.list = self.messages();
                self.index = 0;
                if self.list.is_empty() {
                    self.state = State::Saying(Menu::Main);
                    self.play(vec!["vm-nomore".into()]);
                } else {
                    self.announce();
                }
            }
            '0' => self.menu(now, Menu::Options),
            '#' => self.close(vec!["vm-goodbye".into()], None),
            _ => self.menu(now, Menu::Main),
        }
    }

    /// "First message" / "message 3" / "last message", then the audio.
    fn announce(&mut self) {
        self.audio = None;
        self.state = State::Announcing;
        let last = self.index + 1 == self.list.len();
        let p = if self.index == 0 {
            vec!["vm-first".into(), "vm-message".into()]
        } else if last {
            vec!["vm-last".into(), "vm-message".into()]
        } else {
            let mut p = vec!["vm-message".to_string()];
            p.extend(number_prompts(self.index as i64 + 1));
            p
        };
        self.play(p);
    }

    fn fetch_message(&mut self) {
        let Some(m) = self.list.get(self.index).cloned() else {
            return;
        };
        self.state = State::FetchingMessage;
        self.request(VmRequest::Fetch {
            blob: m.blob,
            codec: m.codec,
            holders: m.holders,
            payload_type: self.payload_type,
        });
    }

    fn message_fetched(&mut self, now: Instant, audio: Option<Arc<[u8]>>) {
        let Some(audio) = audio else {
            // No holder could give it: said as missing, the menu goes on.
            self.state = State::MessageMenu;
            self.play(vec!["vm-msgunavail".into(), "vm-msginstruct".into()]);
            let _ = now;
            return;
        };
        self.audio = Some(audio.clone());
        self.state = State::PlayingMessage;
        self.play_audio(audio);
        self.heard();
    }

    /// A new message played is an old one now (as Asterisk: once it started).
    fn heard(&mut self) {
        let Some(m) = self.list.get_mut(self.index) else {
            return;
        };
        if m.folder == Folder::Inbox {
            m.folder = Folder::Old;
            let op = VoicemailOp::Move {
                mailbox: self.mailbox.clone(),
                id: m.id,
                folder: Folder::Old,
            };
            if let Some(owned) = self.owned.as_mut() {
                if let Some(o) = owned.messages.get_mut(&m.id) {
                    o.folder = Folder::Old;
                }
            }
            self.request(VmRequest::Update(op));
        }
    }

    fn message_key(&mut self, now: Instant, key: char) {
        self.repeats = 0;
        self.deadline = None;
        match key {
            '5' => self.announce(),
            '6' => self.menu(now, Menu::Next),
            '4' => {
                if self.index > 0 {
                    self.index -= 1;
                    self.announce();
                } else {
                    self.state = State::Saying(Menu::Message);
                    self.play(vec!["vm-nomore".into()]);
                }
            }
            '7' => {
                let Some(m) = self.list.get(self.index).cloned() else {
                    return;
                };
                self.request(VmRequest::Update(VoicemailOp::Delete {
                    mailbox: self.mailbox.clone(),
                    id: m.id,
                }));
                if let Some(owned) = self.owned.as_mut() {
                    owned.messages.remove(&m.id);
                }
                self.list.remove(self.index);
                // The one after the deleted message is at its place now.
                self.state = State::Saying(if self.index < self.list.len() {
                    Menu::Message
                } else {
                    Menu::Next
                });
                if self.index >= self.list.len() && !self.list.is_empty() {
                    self.index = self.list.len() - 1;
                }
                self.play(vec!["vm-deleted".into()]);
            }
            '9' => {
                // Two folders: a heard message is saved among the old ones already.
                self.state = State::Saying(Menu::Next);
                self.play(vec!["vm-saved".into()]);
            }
            '*' => self.menu(now, Menu::Main),
            '0' => self.menu(now, Menu::Options),
            '#' => self.close(vec!["vm-goodbye".into()], None),
            _ => {
                self.state = State::MessageMenu;
                self.play(vec!["vm-msginstruct".into()]);
            }
        }
    }

    fn options_key(&mut self, now: Instant, key: char) {
        self.repeats = 0;
        let greeting = |g: Greeting, prompt: &str, s: &mut Session| {
            s.state = State::GreetingPrompt(g);
            s.play(vec![prompt.into()]);
        };
        match key {
            '1' => greeting(Greeting::Unavailable, "vm-rec-unv", self),
            '2' => greeting(Greeting::Busy, "vm-rec-busy", self),
            '3' => greeting(Greeting::Name, "vm-rec-name", self),
            '5' => self.ask(State::NewPin { first: None }, "vm-newpassword"),
            '*' => self.menu(now, Menu::Main),
            '#' => self.close(vec!["vm-goodbye".into()], None),
            _ => self.menu(now, Menu::Options),
        }
    }

    fn store_greeting(&mut self, g: Greeting) {
        self.state = State::StoringGreeting;
        let codec = self.codec();
        self.request(VmRequest::Store {
            mailboxes: vec![self.mailbox.clone()],
            what: Recorded::Greeting(g),
            codec,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pbx_state::voicemail::{hash_pin, GreetingAudio};

    fn t0() -> Instant {
        Instant::now()
    }

    fn steps(s: &mut Session) -> Vec<VmStep> {
        std::iter::from_fn(|| s.poll_step()).collect()
    }

    fn prompts(steps: &[VmStep]) -> Vec<String> {
        steps
            .iter()
            .flat_map(|s| match s {
                VmStep::Prompts(p) => p.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn message(id: u64, folder: Folder) -> VoiceMessage {
        VoiceMessage {
            id,
            blob: format!("blob{id}"),
            codec: Codec::Pcmu,
            size: 8000,
            duration_ms: 1000,
            caller_id: "\"A\" <1001>".into(),
            received_ms: 1,
            folder,
            holders: vec![1, 2],
        }
    }

    fn mailbox(pin: &str, messages: &[(u64, Folder)]) -> Box<Mailbox> {
        let mut m = Mailbox {
            pin_hash: Some(hash_pin("salt", pin)),
            ..Mailbox::default()
        };
        for (id, f) in messages {
            m.messages.insert(*id, message(*id, *f));
        }
        Box::new(m)
    }

    fn key_all(s: &mut Session, now: Instant, keys: &str) -> Vec<VmStep> {
        let mut out = Vec::new();
        for k in keys.chars() {
            s.on_digit(now, k);
            out.extend(steps(s));
        }
        out
    }

    /// The unavailable greeting ("the person at extension 1002 is unavailable", the
    /// instructions), the tone, the recording; `#` stores it, and "saved" is said only
    /// once the driver answered that it is stored.
    #[test]
    fn a_message_is_taken_and_called_saved_only_once_stored() {
        let now = t0();
        let mut s = Session::leave(
            vec!["1002".into()],
            VmGreeting::Unavailable,
            false,
            "\"A\" <1001>".into(),
            8,
        );
        assert_eq!(
            steps(&mut s),
            vec![VmStep::Request(VmRequest::Open {
                mailbox: "1002".into()
            })]
        );
        s.on_reply(now, VmReply::Mailbox(Some(mailbox("1", &[]))));
        let p = prompts(&steps(&mut s));
        assert_eq!(p.first().map(String::as_str), Some("vm-theperson"));
        assert!(p.contains(&"vm-isunavail".to_string()) && p.ends_with(&["vm-intro".into()]));
        s.on_played(now);
        assert_eq!(prompts(&steps(&mut s)), vec!["beep"]);
        s.on_digit(now, '5'); // keys during the tone are nothing
        assert!(steps(&mut s).is_empty());
        s.on_played(now);
        assert_eq!(
            steps(&mut s),
            vec![VmStep::Record {
                max_bytes: 300 * 8000
            }]
        );
        s.on_digit(now, '#');
        assert_eq!(
            steps(&mut s),
            vec![VmStep::Request(VmRequest::Store {
                mailboxes: vec!["1002".into()],
                what: Recorded::Message {
                    caller_id: "\"A\" <1001>".into()
                },
                codec: Codec::Pcma,
            })]
        );
        s.on_played(now); // a stray end of playback changes nothing
        assert!(steps(&mut s).is_empty());
        s.on_reply(now, VmReply::Stored(Ok(())));
        assert_eq!(prompts(&steps(&mut s)), vec!["vm-msgsaved", "vm-goodbye"]);
        s.on_played(now);
        assert_eq!(steps(&mut s), vec![VmStep::Finished(Some("SUCCESS"))]);
    }

    #[test]
    fn the_owners_greeting_is_played_and_pound_skips_it() {
        let now = t0();
        let mut s = Session::leave(vec!["1002".into()], VmGreeting::Busy, true, "x".into(), 0);
        steps(&mut s);
        let mut m = mailbox("1", &[]);
        m.greetings.insert(
            Greeting::Busy,
            GreetingAudio {
                blob: "g".into(),
                codec: Codec::Pcma,
                holders: vec![3],
            },
        );
        s.on_reply(now, VmReply::Mailbox(Some(m)));
        assert_eq!(
            steps(&mut s),
            vec![VmStep::Request(VmRequest::Fetch {
                blob: "g".into(),
                codec: Codec::Pcma,
                holders: vec![3],
                payload_type: 0,
            })]
        );
        let audio: Arc<[u8]> = vec![1u8; 80].into();
        s.on_reply(now, VmReply::Audio(Some(audio.clone())));
        assert_eq!(
            steps(&mut s),
            vec![VmStep::Audio(audio)],
            "no instructions: s"
        );
        s.on_digit(now, '#');
        assert_eq!(
            steps(&mut s),
            vec![VmStep::StopPlay, VmStep::Prompts(vec!["beep".into()])]
        );
    }

    /// The instructions follow the owner's greeting once it has played (not over it);
    /// a recorded name stands for the extension's digits.
    #[test]
    fn a_greeting_or_the_name_plays_before_the_prompts_that_follow_it() {
        let now = t0();
        let audio = |b: &str| GreetingAudio {
            blob: b.into(),
            codec: Codec::Pcmu,
            holders: vec![1],
        };
        let sound: Arc<[u8]> = vec![2u8; 80].into();
        let mut with_greeting = mailbox("1", &[]);
        with_greeting
            .greetings
            .insert(Greeting::Unavailable, audio("g"));
        let mut with_name = mailbox("1", &[]);
        with_name.greetings.insert(Greeting::Name, audio("n"));
        for (m, then) in [
            (with_greeting, vec!["vm-intro".to_string()]),
            (with_name, vec!["vm-isunavail".into(), "vm-intro".into()]),
        ] {
            let mut s = Session::leave(
                vec!["1002".into()],
                VmGreeting::Unavailable,
                false,
                "x".into(),
                0,
            );
            steps(&mut s);
            s.on_reply(now, VmReply::Mailbox(Some(m)));
            assert!(matches!(
                steps(&mut s).as_slice(),
                [VmStep::Request(VmRequest::Fetch { .. })]
            ));
            s.on_reply(now, VmReply::Audio(Some(sound.clone())));
            assert_eq!(steps(&mut s), vec![VmStep::Audio(sound.clone())], "alone");
            s.on_played(now);
            assert_eq!(prompts(&steps(&mut s)), then);
            s.on_played(now);
            assert_eq!(prompts(&steps(&mut s)), vec!["beep"]);
        }
    }

    /// Hanging up is how most callers end a message: it is stored all the same. A
    /// caller that hangs up during the greeting leaves nothing.
    #[test]
    fn hanging_up_stores_the_message_being_recorded() {
        let now = t0();
        let mut s = Session::leave(
            vec!["1002".into(), "1003@sales".into()],
            VmGreeting::Plain,
            false,
            "x".into(),
            0,
        );
        steps(&mut s);
        s.on_reply(now, VmReply::Mailbox(Some(mailbox("1", &[]))));
        s.on_played(now);
        s.on_played(now);
        steps(&mut s);
        s.on_hangup();
        assert!(matches!(
            steps(&mut s).as_slice(),
            [VmStep::Request(VmRequest::Store { mailboxes, .. })] if mailboxes.len() == 2
        ));

        let mut early =
            Session::leave(vec!["1002".into()], VmGreeting::Plain, false, "x".into(), 0);
        steps(&mut early);
        early.on_reply(now, VmReply::Mailbox(Some(mailbox("1", &[]))));
        steps(&mut early);
        early.on_hangup();
        assert!(steps(&mut early).is_empty());
    }

    #[test]
    fn no_mailbox_and_a_full_one_fail() {
        let now = t0();
        let mut s = Session::leave(vec!["9".into()], VmGreeting::Plain, false, "x".into(), 0);
        steps(&mut s);
        s.on_reply(now, VmReply::Mailbox(None));
        assert_eq!(steps(&mut s), vec![VmStep::Finished(Some("FAILED"))]);

        let full: Vec<(u64, Folder)> = (1..=MAX_MESSAGES as u64)
            .map(|i| (i, Folder::Old))
            .collect();
        let mut s = Session::leave(vec!["9".into()], VmGreeting::Plain, false, "x".into(), 0);
        steps(&mut s);
        s.on_reply(now, VmReply::Mailbox(Some(mailbox("1", &full))));
        assert_eq!(prompts(&steps(&mut s)), vec!["vm-mailboxfull"]);
        s.on_played(now);
        assert_eq!(steps(&mut s), vec![VmStep::Finished(Some("FAILED"))]);
    }

    /// Three wrong logins and the caller is sent away; a wrong mailbox is asked for its
    /// PIN all the same (which mailboxes exist is not told).
    #[test]
    fn logins_are_limited() {
        let now = t0();
        let mut s = Session::main(None, false, 0, now);
        assert_eq!(prompts(&steps(&mut s)), vec!["vm-login"]);
        for attempt in 0..LOGIN_ATTEMPTS {
            let out = key_all(&mut s, now, "1002#");
            assert_eq!(prompts(&out), vec!["vm-password"]);
            // The first key stops the prompt.
            let out = key_all(&mut s, now, "9999#");
            assert_eq!(
                out,
                vec![
                    VmStep::StopPlay,
                    VmStep::Request(VmRequest::Open {
                        mailbox: "1002".into()
                    })
                ]
            );
            s.on_reply(now, VmReply::Mailbox(Some(mailbox("4242", &[]))));
            let p = prompts(&steps(&mut s));
            if attempt + 1 < LOGIN_ATTEMPTS {
                assert_eq!(p, vec!["vm-incorrect-mailbox"]);
            } else {
                assert_eq!(p, vec!["vm-incorrect", "vm-goodbye"]);
            }
        }
        s.on_played(now);
        assert_eq!(steps(&mut s), vec![VmStep::Finished(None)]);
    }

    /// The owner logs in, hears the counts, plays the new message (then marked heard),
    /// deletes the old one, and is told there are no more.
    #[test]
    fn the_owner_listens_and_deletes() {
        let now = t0();
        let mut s = Session::main(Some("1002".into()), false, 0, now);
        assert_eq!(prompts(&steps(&mut s)), vec!["vm-password"]);
        // No key at all: the pause ends the PIN, which is wrong.
        s.on_played(now);
        assert_eq!(s.poll_timeout(), Some(now + KEY_TIMEOUT));
        key_all(&mut s, now, "42");
        s.on_timeout(now + KEY_TIMEOUT);
        steps(&mut s);
        s.on_reply(
            now,
            VmReply::Mailbox(Some(mailbox(
                "4242",
                &[(7, Folder::Old), (9, Folder::Inbox)],
            ))),
        );
        // Wrong: asked again (the mailbox was given: its number is asked now).
        assert_eq!(prompts(&steps(&mut s)), vec!["vm-incorrect-mailbox"]);
        key_all(&mut s, now, "1002#");
        key_all(&mut s, now, "4242#");
        s.on_reply(
            now,
            VmReply::Mailbox(Some(mailbox(
                "4242",
                &[(7, Folder::Old), (9, Folder::Inbox)],
            ))),
        );
        let p = prompts(&steps(&mut s));
        assert_eq!(
            p,
            vec![
                "vm-youhave",
                "digits/1",
                "vm-INBOX",
                "vm-message",
                "vm-and",
                "digits/1",
                "vm-Old",
                "vm-message",
                "vm-onefor",
                "vm-opts"
            ]
        );
        let out = key_all(&mut s, now, "1");
        assert_eq!(prompts(&out), vec!["vm-first", "vm-message"]);
        s.on_played(now);
        assert!(matches!(
            steps(&mut s).as_slice(),
            [VmStep::Request(VmRequest::Fetch { blob, .. })] if blob == "blob9"
        ));
        let audio: Arc<[u8]> = vec![7u8; 160].into();
        s.on_reply(now, VmReply::Audio(Some(audio.clone())));
        assert_eq!(
            steps(&mut s),
            vec![
                VmStep::Audio(audio),
                VmStep::Request(VmRequest::Update(VoicemailOp::Move {
                    mailbox: "1002".into(),
                    id: 9,
                    folder: Folder::Old
                }))
            ]
        );
        s.on_played(now);
        assert_eq!(prompts(&steps(&mut s)), vec!["vm-msginstruct"]);
        // 6: the next (and last) message, the old one; 7 deletes it.
        let out = key_all(&mut s, now, "6");
        assert_eq!(prompts(&out), vec!["vm-last", "vm-message"]);
        let out = key_all(&mut s, now, "7");
        assert!(
            out.contains(&VmStep::Request(VmRequest::Update(VoicemailOp::Delete {
                mailbox: "1002".into(),
                id: 7
            })))
        );
        assert_eq!(prompts(&out), vec!["vm-deleted"]);
        s.on_played(now);
        assert_eq!(prompts(&steps(&mut s)), vec!["vm-nomore"]);
        s.on_played(now);
        let p = prompts(&steps(&mut s));
        assert_eq!(
            &p[..5],
            ["vm-youhave", "vm-no", "vm-INBOX", "vm-messages", "vm-and"]
        );
        let out = key_all(&mut s, now, "#");
        assert_eq!(prompts(&out), vec!["vm-goodbye"]);
    }

    #[test]
    fn the_owner_records_a_greeting_and_changes_the_pin() {
        let now = t0();
        let mut s = Session::main(Some("1002".into()), true, 8, now);
        steps(&mut s);
        s.on_reply(now, VmReply::Mailbox(Some(mailbox("1", &[]))));
        steps(&mut s);
        key_all(&mut s, now, "0");
        let out = key_all(&mut s, now, "1");
        assert_eq!(prompts(&out), vec!["vm-rec-unv"]);
        s.on_played(now);
        assert_eq!(prompts(&steps(&mut s)), vec!["beep"]);
        s.on_played(now);
        assert_eq!(
            steps(&mut s),
            vec![VmStep::Record {
                max_bytes: 60 * 8000
            }]
        );
        let out = key_all(&mut s, now, "#");
        assert_eq!(
            out,
            vec![VmStep::Request(VmRequest::Store {
                mailboxes: vec!["1002".into()],
                what: Recorded::Greeting(Greeting::Unavailable),
                codec: Codec::Pcma
            })]
        );
        s.on_reply(now, VmReply::Stored(Ok(())));
        assert_eq!(prompts(&steps(&mut s)), vec!["vm-msgsaved"]);
        s.on_played(now);
        assert_eq!(prompts(&steps(&mut s)), vec!["vm-options"]);
        key_all(&mut s, now, "5");
        key_all(&mut s, now, "1234#");
        // Not the same twice: refused.
        let out = key_all(&mut s, now, "1235#");
        assert_eq!(prompts(&out), vec!["vm-mismatch"]);
        s.on_played(now);
        steps(&mut s);
        key_all(&mut s, now, "5");
        key_all(&mut s, now, "1234#");
        let out = key_all(&mut s, now, "1234#");
        assert_eq!(
            out,
            vec![
                VmStep::StopPlay,
                VmStep::Request(VmRequest::SetPin {
                    mailbox: "1002".into(),
                    pin: "1234".into()
                })
            ]
        );
        s.on_reply(now, VmReply::Updated(true));
        assert_eq!(prompts(&steps(&mut s)), vec!["vm-passchanged"]);
    }
}
