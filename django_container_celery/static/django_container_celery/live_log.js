/* The live output panel on a running job's admin page (see admin/live.py).
 *
 * Every data-interval milliseconds it asks the panel's data-tail-url for the tails of the
 * container's stdout and stderr and shows them. The output is untrusted: it only ever goes
 * into textContent, never into HTML. Reading stops once the job no longer runs, slows down
 * while the server or the daemon fails, and pauses while the tab is hidden.
 */
(function () {
  "use strict";

  var MAX_DELAY = 30000; // longest wait between two reads while they fail
  var REQUEST_TIMEOUT = 15000; // a read the server has not answered by then has failed

  function atBottom(box) {
    // A few pixels of slack: zoomed pages report fractional scroll positions.
    return box.scrollHeight - box.scrollTop - box.clientHeight < 4;
  }

  function showText(box, text) {
    if (box.textContent === text) {
      return; // left alone, so a reader's selection survives
    }
    var follow = atBottom(box);
    box.textContent = text;
    if (follow) {
      box.scrollTop = box.scrollHeight;
    }
  }

  function start(panel) {
    var url = panel.getAttribute("data-tail-url");
    var interval = parseInt(panel.getAttribute("data-interval"), 10) || 2000;
    var stateLine = panel.querySelector(".dcc-live-state");
    var updatedLine = panel.querySelector(".dcc-live-updated");
    var boxes = {
      stdout: panel.querySelector('.dcc-live-log[data-stream="stdout"]'),
      stderr: panel.querySelector('.dcc-live-log[data-stream="stderr"]')
    };
    var delay = interval;

    // The state line is a live region: it is rewritten only when its text changes, so a
    // screen reader announces changes of state, not every read.
    function say(state, text) {
      panel.setAttribute("data-state", state);
      if (stateLine.textContent !== text) {
        stateLine.textContent = text;
      }
    }

    function later() {
      window.setTimeout(read, delay);
    }

    function failed(text) {
      delay = Math.min(delay * 2, MAX_DELAY);
      say("error", text + " Trying again in " + Math.round(delay / 1000) + " s.");
      later();
    }

    function ended(data) {
      say("ended", "Container ended (" + (data.status_display || data.status) + ") — ");
      var reload = document.createElement("a");
      reload.href = window.location.href;
      reload.textContent = "reload the page for the outcome.";
      stateLine.appendChild(reload);
    }

    function received(data) {
      if (data.error) {
        // The boxes keep the last output read; the daemon may answer again.
        failed("Docker daemon not answering: " + data.error);
        return;
      }
      ["stdout", "stderr"].forEach(function (stream) {
        // An ended job's stored log may be empty (a cancelled container is removed before
        // its output is kept): what was read while it ran then stays in view.
        if (data.running || data[stream]) {
          showText(boxes[stream], data[stream]);
        }
      });
      updatedLine.textContent = "updated " + new Date().toLocaleTimeString();
      if (!data.running) {
        ended(data);
        return;
      }
      delay = interval;
      say(
        "live",
        data.status === "launching" ? "Launching — waiting for the container…" : "Running — live."
      );
      later();
    }

    function read() {
      if (document.hidden) {
        // Nobody is looking: read again when the tab is shown.
        document.addEventListener("visibilitychange", read, { once: true });
        return;
      }
      var options = {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "application/json" }
      };
      if (window.AbortSignal && AbortSignal.timeout) {
        options.signal = AbortSignal.timeout(REQUEST_TIMEOUT);
      }
      window.fetch(url, options).then(
        function (response) {
          if (response.status === 403 || response.redirected) {
            // Signed out (the admin redirects to its login page) or no longer allowed.
            say("ended", "Not allowed to read this job's output any more; reload the page.");
            return;
          }
          if (!response.ok) {
            failed("The server answered " + response.status + ".");
            return;
          }
          return response.json().then(received, function () {
            failed("The server's answer could not be read.");
          });
        },
        function () {
          failed("The server is not answering.");
        }
      );
    }

    read();
  }

  function startAll() {
    var panels = document.querySelectorAll(".dcc-live[data-tail-url]");
    for (var i = 0; i < panels.length; i++) {
      start(panels[i]);
    }
  }

  // The admin loads its media in the page's head, before the panel exists.
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", startAll);
  } else {
    startAll();
  }
})();
