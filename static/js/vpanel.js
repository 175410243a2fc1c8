// vpanel's page behaviour, on top of Bootstrap's bundle. Everything here is a
// convenience: the forms post and the server checks them without it.
//
// No page reloads itself: what changes while a page is open reaches it over its
// websocket (static/js/live.js), which also swaps in the server's fresh copy of a
// region when the actions a user may take have changed. `window.vpanel.bind`
// gives such a region the behaviour below.
(function () {
  "use strict";

  function bind(root) {
    // Reinstall and delete: the button waits until the vserver's name is typed.
    root.querySelectorAll("[data-confirm-name]").forEach(function (button) {
      var input = button.form.querySelector("input[name='confirm']");
      if (!input) {
        return;
      }
      var check = function () {
        button.disabled = input.value.trim() !== button.getAttribute("data-confirm-name");
      };
      input.addEventListener("input", check);
      check();
    });

    // A dialog that is closed forgets what was typed or ticked in it ("force", a name).
    root.querySelectorAll(".modal").forEach(function (modal) {
      modal.addEventListener("hidden.bs.modal", function () {
        var form = modal.querySelector("form");
        if (form) {
          form.reset();
          form.querySelectorAll("[data-confirm-name]").forEach(function (b) { b.disabled = true; });
        }
      });
    });

    // Copy buttons next to secrets shown once.
    root.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var field = document.querySelector(button.getAttribute("data-copy"));
        if (!field || !navigator.clipboard) {
          return;
        }
        navigator.clipboard.writeText(field.value).then(function () {
          button.textContent = "Copied";
        });
      });
    });
  }

  window.vpanel = { bind: bind };

  document.addEventListener("DOMContentLoaded", function () {
    // A dialog whose form came back with errors opens again, showing them.
    var invalid = document.querySelector(".modal .is-invalid, .modal .alert-danger");
    if (invalid && window.bootstrap) {
      window.bootstrap.Modal.getOrCreateInstance(invalid.closest(".modal")).show();
    }
    bind(document);
  });
})();
