"""A Flask app whose users log in through authbroker.

Settings, from the environment:
  AUTHBROKER_ADDR       authbroker's gRPC address (default 127.0.0.1:50051, where `authbroker dev` listens)
  AUTHBROKER_API_KEY    this app's API key (none with `authbroker dev`)
  AUTHBROKER_PROVIDERS  providers to offer, comma-separated; default: AdminService.ListProviders,
                        which needs an admin key (or `authbroker dev`, which has no keys)
  PORT                  where this app listens (default 8000)
  PUBLIC_URL            where browsers reach it (default http://127.0.0.1:PORT); PUBLIC_URL + /callback
                        must be one of each provider's redirect_uris, exactly
  SECRET_KEY            signs the session cookie; without it, a random one per start
"""

import hmac
import json
import logging
import os
import secrets
from pathlib import Path

from flask import Flask, abort, redirect, render_template, request, send_file, session

from broker import OUTCOME_LINK_REQUIRED, OUTCOME_USER_CREATED, RETRY_SAME_CALL, Broker, BrokerError

WEB_DIR = Path(__file__).resolve().parent.parent
MESSAGES = json.loads((WEB_DIR / "reasons.json").read_text())

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("example")

PORT = int(os.environ.get("PORT", "8000"))
PUBLIC_URL = os.environ.get("PUBLIC_URL", f"http://127.0.0.1:{PORT}").rstrip("/")
REDIRECT_URI = PUBLIC_URL + "/callback"

app = Flask(__name__)
app.secret_key = os.environ.get("SECRET_KEY") or secrets.token_bytes(32)
if "SECRET_KEY" not in os.environ:
    log.warning("SECRET_KEY is not set: sessions end when the app restarts")
app.config.update(
    # Lax: the provider's redirect to /callback is a top-level GET, so the
    # cookie comes along; a cross-site POST (to /link, /logout) gets none.
    SESSION_COOKIE_SAMESITE="Lax",
    SESSION_COOKIE_HTTPONLY=True,
    SESSION_COOKIE_SECURE=PUBLIC_URL.startswith("https://"),
)

broker = Broker(os.environ.get("AUTHBROKER_ADDR", "127.0.0.1:50051"), os.environ.get("AUTHBROKER_API_KEY"))


def login_buttons():
    """(name, label) per provider: its display name, or its name where two
    share a display name."""
    configured = os.environ.get("AUTHBROKER_PROVIDERS")
    if configured:
        providers = [(n.strip(), n.strip()) for n in configured.split(",") if n.strip()]
    else:
        providers = broker.providers()
    shown = [label for _, label in providers]
    return [(name, label if shown.count(label) == 1 else name) for name, label in providers]


def failure(reason):
    log.info("sign-in failed: %s", reason)
    message = MESSAGES.get(reason, MESSAGES["_default"])
    status = 503 if reason in RETRY_SAME_CALL else 400
    return render_template("error.html", reason=reason, message=message), status


def sign_in(binding, identity, outcome):
    # A fresh session for the user: nothing from before the login survives.
    session.clear()
    session["user"] = {
        "user_id": binding.user_id,
        "provider": binding.provider,
        "subject": binding.subject,
        "display_name": identity.display_name or identity.username,
        "username": identity.username,
        "email": identity.email,
        "email_verified": identity.email_verified,
        "avatar_url": identity.avatar_url,
        "outcome": outcome,
    }


@app.get("/")
def home():
    try:
        buttons = login_buttons()
    except BrokerError as e:
        return failure(e.reason)
    return render_template("home.html", user=session.get("user"), buttons=buttons)


@app.get("/style.css")
def style():
    return send_file(WEB_DIR / "style.css", mimetype="text/css")


@app.post("/login/<provider>")
def login(provider):
    try:
        begun = broker.begin(provider, REDIRECT_URI, "/")
    except BrokerError as e:
        return failure(e.reason)
    # The state goes into this browser's signed session: the callback must
    # bring back this very value (login-CSRF defence). One pending login per
    # session; a newer one replaces it.
    session["login"] = {"state": begun.state, "provider": provider}
    return redirect(begun.authorize_url, code=303)


@app.get("/callback")
def callback():
    pending = session.pop("login", None)
    state = request.args.get("state", "")
    if not pending or not state or not hmac.compare_digest(pending["state"], state):
        return failure("STATE_MISMATCH")
    try:
        done = broker.complete(
            state,
            request.args.get("code", ""),
            request.args.get("error", ""),
            request.args.get("error_description", ""),
        )
    except BrokerError as e:
        return failure(e.reason)
    if done.outcome == OUTCOME_LINK_REQUIRED:
        # The ticket is redeemable only with this app's API key, for
        # link_ticket_ttl; it waits in the session for the person's choice.
        session["link"] = {
            "ticket": done.link_ticket,
            "provider": done.identity.provider,
            "name": done.identity.display_name or done.identity.username,
            "return_to": done.return_to,
        }
        return redirect("/link", code=303)
    sign_in(done.binding, done.identity, "created" if done.outcome == OUTCOME_USER_CREATED else "signed_in")
    return redirect(done.return_to or "/", code=303)


@app.get("/link")
def link_page():
    if "link" not in session:
        return redirect("/", code=303)
    return render_template("link.html", link=session["link"], user=session.get("user"))


@app.post("/link")
def link():
    pending = session.pop("link", None)
    if not pending:
        return redirect("/", code=303)
    user = session.get("user")
    if request.form.get("account") == "current":
        # Only the account this browser is signed in to: linking to an
        # account named in the form would let anyone take over any account.
        if not user:
            abort(403)
        user_id = user["user_id"]
    else:
        user_id = "app-" + secrets.token_hex(8)
    try:
        linked = broker.link(pending["ticket"], user_id)
    except BrokerError as e:
        return failure(e.reason)
    sign_in(linked.binding, linked.identity, "linked")
    return redirect(linked.return_to or "/", code=303)


@app.post("/logout")
def logout():
    session.clear()
    return redirect("/", code=303)


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=PORT, debug=False, use_reloader=False)
