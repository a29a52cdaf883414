// A mutual-TLS handshake on loopback between a server and a client, each
// with its own keystore and truststore (any type Java detects: JKS, PKCS12).
//
// usage: java MtlsCheck.java SERVER_KS SERVER_KS_PW SERVER_TS SERVER_TS_PW
//                            CLIENT_KS CLIENT_KS_PW CLIENT_TS CLIENT_TS_PW SERVER_NAME
// (…_PW are files holding the password).  Prints one "server:" and one
// "client:" line; exit 0 when both sides completed the exchange, 3 otherwise.
import java.io.*;
import java.net.*;
import java.nio.file.*;
import java.security.KeyStore;
import java.util.List;
import javax.net.ssl.*;

public class MtlsCheck {
    static char[] pw(String file) throws IOException {
        return Files.readString(Path.of(file)).strip().toCharArray();
    }

    static SSLContext context(String ks, String ksPw, String ts, String tsPw) throws Exception {
        KeyStore keys = KeyStore.getInstance(new File(ks), pw(ksPw));
        KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(keys, pw(ksPw));
        KeyStore trust = KeyStore.getInstance(new File(ts), pw(tsPw));
        if (trust.size() == 0) throw new IllegalStateException("truststore " + ts + " has no entries");
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
        return ctx;
    }

    public static void main(String[] a) throws Exception {
        SSLContext sc = context(a[0], a[1], a[2], a[3]);
        SSLContext cc = context(a[4], a[5], a[6], a[7]);
        String serverName = a[8];
        SSLServerSocket ss = (SSLServerSocket) sc.getServerSocketFactory()
                .createServerSocket(0, 1, InetAddress.getLoopbackAddress());
        ss.setNeedClientAuth(true);
        ss.setSoTimeout(30000);
        String[] server = {"FAIL no connection"};
        Thread t = new Thread(() -> {
            try (SSLSocket s = (SSLSocket) ss.accept()) {
                s.setSoTimeout(30000);
                s.startHandshake();
                String peer = s.getSession().getPeerPrincipal().getName();
                BufferedReader in = new BufferedReader(new InputStreamReader(s.getInputStream()));
                String line = in.readLine();
                PrintWriter out = new PrintWriter(s.getOutputStream(), true);
                out.println("echo " + line);
                server[0] = "OK peer=" + peer + " protocol=" + s.getSession().getProtocol();
            } catch (Exception e) {
                server[0] = "FAIL " + e;
            }
        });
        t.start();
        String client;
        try (Socket plain = new Socket(InetAddress.getLoopbackAddress(), ss.getLocalPort());
             SSLSocket s = (SSLSocket) cc.getSocketFactory().createSocket(plain, serverName, ss.getLocalPort(), true)) {
            s.setSoTimeout(30000);
            SSLParameters p = s.getSSLParameters();
            p.setEndpointIdentificationAlgorithm("HTTPS");   // as Kafka's default
            p.setServerNames(List.of(new SNIHostName(serverName)));
            s.setSSLParameters(p);
            s.startHandshake();
            PrintWriter out = new PrintWriter(s.getOutputStream(), true);
            out.println("hello");
            String reply = new BufferedReader(new InputStreamReader(s.getInputStream())).readLine();
            client = reply != null && reply.equals("echo hello")
                    ? "OK peer=" + s.getSession().getPeerPrincipal().getName()
                    : "FAIL reply " + reply;
        } catch (Exception e) {
            client = "FAIL " + e;
        }
        t.join(30000);
        ss.close();
        System.out.println("server: " + server[0]);
        System.out.println("client: " + client);
        System.exit(server[0].startsWith("OK") && client.startsWith("OK") ? 0 : 3);
    }
}
