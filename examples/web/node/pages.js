// The app's pages. Every interpolated value goes through `html`, which
// escapes it unless it is markup that `html` itself made.

class Markup {
  constructor(text) {
    this.text = text;
  }
  toString() {
    return this.text;
  }
}

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escape = (value) => String(value ?? '').replace(/[&<>"']/g, (c) => ESCAPES[c]);

function html(strings, ...values) {
  let out = strings[0];
  values.forEach((value, i) => {
    const parts = Array.isArray(value) ? value : [value];
    out += parts.map((v) => (v instanceof Markup ? v.text : escape(v))).join('') + strings[i + 1];
  });
  return new Markup(out);
}

function layout(title, main) {
  return html`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${title} · Express</title>
<link rel="stylesheet" href="/style.css">
</head>
<body>
<header><a href="/">Example app</a> · Express + authbroker</header>
<main>${main}</main>
</body>
</html>
`.text;
}

const OUTCOMES = {
  created: 'Your account was created just now.',
  signed_in: 'Welcome back.',
  linked: 'This sign-in is now linked to your account.',
};

function loginButtons(buttons) {
  return buttons.map(
    ([name, label]) =>
      html`<form class="inline" method="post" action="/login/${name}"><button>Log in with ${label}</button></form>\n`,
  );
}

function home(user, buttons) {
  if (!user) {
    return layout('Welcome', html`<h1>Welcome</h1><p>Sign in to continue.</p>\n${loginButtons(buttons)}`);
  }
  const verified = user.email ? (user.emailVerified ? ' (verified)' : ' (not verified)') : '';
  return layout(
    'Your account',
    html`<h1>Signed in</h1>
<div class="profile">
  ${user.avatarUrl ? html`<img src="${user.avatarUrl}" alt="">` : ''}
  <div><strong id="display-name">${user.displayName}</strong><br>
  <span id="outcome" data-outcome="${user.outcome}">${OUTCOMES[user.outcome]}</span></div>
</div>
<dl>
  <dt>User id</dt><dd><code id="user-id">${user.userId}</code></dd>
  <dt>Signed in with</dt><dd>${user.provider} (subject ${user.subject})</dd>
  <dt>Username</dt><dd>${user.username}</dd>
  <dt>Email</dt><dd>${user.email}${verified}</dd>
</dl>
<form class="inline" method="post" action="/logout"><button class="secondary">Log out</button></form>
<h2>Link another sign-in to this account</h2>
${loginButtons(buttons)}`,
  );
}

function link(pending, user) {
  return layout(
    'Link your sign-in',
    html`<h1>Link your sign-in</h1>
<p>You signed in at <strong>${pending.provider}</strong> as <strong>${pending.name}</strong>,
which is not linked to an account of this app yet.</p>
<form method="post" action="/link">
${user ? html`<button name="account" value="current">Link to my account (${user.displayName})</button>` : ''}
<button name="account" value="new" class="${user ? 'secondary' : ''}">Create a new account</button>
</form>
<p class="note">To link it to an existing account, sign in to that account first, then sign in here again.</p>`,
  );
}

function error(reason, message) {
  return layout(
    'Sign-in failed',
    html`<div class="error">
<h1>Sign-in failed</h1>
<p id="error-message">${message}</p>
<p class="note">Reason: <code id="error-reason">${reason}</code></p>
<p><a href="/">Back to the start</a></p>
</div>`,
  );
}

module.exports = { home, link, error };
