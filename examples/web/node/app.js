// An Express app whose users log in through authbroker.
//
// Settings, from the environment:
//   AUTHBROKER_ADDR       authbroker's gRPC address (default 127.0.0.1:50051, where `authbroker dev` listens)
//   AUTHBROKER_API_KEY    this app's API key (none with `authbroker dev`)
//   AUTHBROKER_PROVIDERS  providers to offer, comma-separated; default: AdminService.ListProviders,
//                         which needs an admin key (or `authbroker dev`, which has no keys)
//   PORT                  where this app listens (default 8000)
//   PUBLIC_URL            where browsers reach it (default http://127.0.0.1:PORT); PUBLIC_URL + /callback
//                         must be one of each provider's redirect_uris, exactly
//   SECRET_KEY            signs the session cookie; without it, a random one per start

const crypto = require('node:crypto');
const path = require('node:path');
const express = require('express');
const cookieSession = require('cookie-session');
const { Broker, BrokerError, RETRY_SAME_CALL } = require('./broker');
const pages = require('./pages');

const WEB_DIR = path.resolve(__dirname, '..');
const MESSAGES = require(path.join(WEB_DIR, 'reasons.json'));

const PORT = Number(process.env.PORT || 8000);
const PUBLIC_URL = (process.env.PUBLIC_URL || `http://127.0.0.1:${PORT}`).replace(/\/+$/, '');
const REDIRECT_URI = `${PUBLIC_URL}/callback`;

let secret = process.env.SECRET_KEY;
if (!secret) {
  console.warn('SECRET_KEY is not set: sessions end when the app restarts');
  secret = crypto.randomBytes(32).toString('hex');
}

const broker = new Broker(process.env.AUTHBROKER_ADDR || '127.0.0.1:50051', process.env.AUTHBROKER_API_KEY);
const app = express();
app.use(
  cookieSession({
    name: 'session',
    keys: [secret],
    // Lax: the provider's redirect to /callback is a top-level GET, so the
    // cookie comes along; a cross-site POST (to /link, /logout) gets none.
    sameSite: 'lax',
    httpOnly: true,
    secure: PUBLIC_URL.startsWith('https://'),
  }),
);
app.use(express.urlencoded({ extended: false }));

/** [name, label] per provider: its display name, or its name where two
 * share a display name. */
async function loginButtons() {
  const configured = process.env.AUTHBROKER_PROVIDERS;
  const providers = configured
    ? configured.split(',').map((n) => n.trim()).filter(Boolean).map((n) => [n, n])
    : await broker.providers();
  const shown = providers.map(([, label]) => label);
  return providers.map(([name, label]) => [name, shown.indexOf(label) === shown.lastIndexOf(label) ? label : name]);
}

function failure(res, reason) {
  console.info(`sign-in failed: ${reason}`);
  res.status(RETRY_SAME_CALL.has(reason) ? 503 : 400).send(pages.error(reason, MESSAGES[reason] || MESSAGES._default));
}

// Expected failures (a reason from authbroker) become the error page; any
// other exception goes on to Express's handler.
const handle = (route) => async (req, res, next) => {
  try {
    await route(req, res);
  } catch (e) {
    if (e instanceof BrokerError) failure(res, e.reason);
    else next(e);
  }
};

function signIn(req, binding, identity, outcome) {
  // A fresh session for the user: nothing from before the login survives.
  req.session = {
    user: {
      userId: binding.userId,
      provider: binding.provider,
      subject: binding.subject,
      displayName: identity.displayName || identity.username,
      username: identity.username,
      email: identity.email,
      emailVerified: identity.emailVerified,
      avatarUrl: identity.avatarUrl,
      outcome,
    },
  };
}

app.get('/', handle(async (req, res) => {
  res.send(pages.home(req.session.user, await loginButtons()));
}));

app.get('/style.css', (req, res) => res.type('text/css').sendFile(path.join(WEB_DIR, 'style.css')));

app.post('/login/:provider', handle(async (req, res) => {
  const begun = await broker.begin(req.params.provider, REDIRECT_URI, '/');
  // The state goes into this browser's signed session: the callback must
  // bring back this very value (login-CSRF defence). One pending login per
  // session; a newer one replaces it.
  req.session.login = { state: begun.state, provider: req.params.provider };
  res.redirect(303, begun.authorizeUrl);
}));

function sameState(expected, got) {
  const a = Buffer.from(String(expected));
  const b = Buffer.from(String(got));
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

app.get('/callback', handle(async (req, res) => {
  const pending = req.session.login;
  delete req.session.login;
  const { state = '', code = '', error = '', error_description: errorDescription = '' } = req.query;
  if (!pending || !state || !sameState(pending.state, state)) {
    failure(res, 'STATE_MISMATCH');
    return;
  }
  const done = await broker.complete(String(state), String(code), String(error), String(errorDescription));
  if (done.outcome === 'OUTCOME_LINK_REQUIRED') {
    // The ticket is redeemable only with this app's API key, for
    // link_ticket_ttl; it waits in the session for the person's choice.
    req.session.link = {
      ticket: done.linkTicket,
      provider: done.identity.provider,
      name: done.identity.displayName || done.identity.username,
      returnTo: done.returnTo,
    };
    res.redirect(303, '/link');
    return;
  }
  signIn(req, done.binding, done.identity, done.outcome === 'OUTCOME_USER_CREATED' ? 'created' : 'signed_in');
  res.redirect(303, done.returnTo || '/');
}));

app.get('/link', (req, res) => {
  if (!req.session.link) return res.redirect(303, '/');
  res.send(pages.link(req.session.link, req.session.user));
});

app.post('/link', handle(async (req, res) => {
  const pending = req.session.link;
  delete req.session.link;
  if (!pending) return res.redirect(303, '/');
  const user = req.session.user;
  let userId;
  if (req.body.account === 'current') {
    // Only the account this browser is signed in to: linking to an account
    // named in the form would let anyone take over any account.
    if (!user) return res.sendStatus(403);
    userId = user.userId;
  } else {
    userId = `app-${crypto.randomBytes(8).toString('hex')}`;
  }
  const linked = await broker.link(pending.ticket, userId);
  signIn(req, linked.binding, linked.identity, 'linked');
  res.redirect(303, linked.returnTo || '/');
}));

app.post('/logout', (req, res) => {
  req.session = null;
  res.redirect(303, '/');
});

app.listen(PORT, '127.0.0.1', () => console.log(`listening on ${PUBLIC_URL}`));
